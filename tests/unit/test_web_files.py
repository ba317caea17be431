"""The page's files are served, open without the key, and nothing else opens with them."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from diffusiond.api.security import BearerKeyMiddleware
from diffusiond.web import STATIC_DIR, web_routes

KEY = "unit-test-key-0123456789"
SCRIPTS = sorted(path.name for path in STATIC_DIR.glob("*.js"))


async def secret(_request: Request) -> Response:
    return PlainTextResponse("secret")


def client() -> TestClient:
    app = Starlette(
        routes=[Route("/v1/secret", secret), *web_routes()],
        middleware=[Middleware(BearerKeyMiddleware, api_key=KEY)],
    )
    return TestClient(app)


def test_the_page_and_its_files_need_no_key() -> None:
    with client() as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert page.text == (STATIC_DIR / "index.html").read_text()
        for script_name in SCRIPTS:
            script = http.get(f"/ui/{script_name}")
            assert script.status_code == 200, script_name
            assert "javascript" in script.headers["content-type"]
            assert f'<script src="ui/{script_name}" defer></script>' in page.text, script_name
        assert http.get("/ui/style.css").headers["content-type"].startswith("text/css")


def test_the_api_still_needs_the_key() -> None:
    with client() as http:
        assert http.get("/v1/secret").status_code == 401
        assert http.get("/v1/secret", headers={"Authorization": f"Bearer {KEY}"}).text == "secret"
        # Under the open prefix, only the page's own files: never a way around the key.
        assert http.get("/ui/../v1/secret").text != "secret"
        assert http.get("/ui/%2e%2e/v1/secret").text != "secret"
        assert http.get("/ui/missing.js").status_code == 404


def test_every_script_is_loaded_after_the_ones_it_uses() -> None:
    # Each module sets a window.Diffusiond* object that the later ones read at their start.
    page = (STATIC_DIR / "index.html").read_text()
    loaded = re.findall(r'<script src="ui/([a-z]+\.js)" defer></script>', page)
    assert sorted(loaded) == SCRIPTS
    assert loaded[0] == "http.js"
    assert loaded[-1] == "app.js"
    for name in loaded:
        text = (STATIC_DIR / name).read_text()
        for used in re.findall(r"window\.(Diffusiond[A-Za-z]+)", text):
            maker = next(n for n in loaded if f"window.{used} = " in (STATIC_DIR / n).read_text())
            assert loaded.index(maker) <= loaded.index(name), (name, used)


def test_the_page_uses_only_relative_urls_and_nothing_from_elsewhere() -> None:
    for name in ("index.html", "style.css", *SCRIPTS):
        text = (STATIC_DIR / name).read_text()
        assert "http://" not in text, name
        assert "https://" not in text, name
        assert 'src="/' not in text, name
        assert 'href="/' not in text, name
