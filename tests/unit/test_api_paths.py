"""Paths as a hostile client sends them, not as httpx would tidy them (issue 14, item 7).

httpx (and so TestClient) resolves `/../` before sending, so a traversal attempt made with
it never reaches the server. These tests hand the app raw ASGI scopes instead, with the
dot segments and their escapes left in.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from urllib.parse import unquote

import pytest
from starlette.types import ASGIApp, Message

from diffusiond.web import STATIC_DIR
from tests.support.inprocess import CONFIG, in_process_api

KEY = "paths-key-0123456789"
OUTSIDE = STATIC_DIR.parent / "__init__.py"  # a file next to static/, never to be served
TRAVERSALS = [
    "/ui/../__init__.py",
    "/ui/../../api/security.py",
    "/ui/./../__init__.py",
    "/ui/..%2f__init__.py",
    "/ui/%2e%2e/__init__.py",
    "/ui/%2e%2e%2f__init__.py",
    "/ui//../__init__.py",
    "/ui/..\\__init__.py",
]


def call_raw(app: ASGIApp, raw_path: str, method: str = "GET", **headers: str) -> dict[str, Any]:
    """One request with `raw_path` exactly as given: the path is decoded as a server
    (uvicorn) decodes it, percent escapes and nothing else; dot segments stay."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")]
        + [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8081),
    }
    sent: list[Message] = []
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays: the app cancels this once done
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start["status"], "body": body}


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_file_outside_static_is_served(path: str) -> None:
    with in_process_api() as api:
        answer = call_raw(api.client.app, path)
    assert answer["status"] == 404, answer
    assert OUTSIDE.read_bytes()[:60] not in answer["body"]
    assert b"hmac" not in answer["body"]  # nor api/security.py


def test_the_static_files_themselves_are_served_raw() -> None:
    with in_process_api() as api:
        answer = call_raw(api.client.app, "/ui/app.js")
    assert answer["status"] == 200
    assert answer["body"] == (STATIC_DIR / "app.js").read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../v1/images/generations",
        "/ui/%2e%2e/v1/images/generations",
        "/ui/./../openapi.json",
        "/ui/..%2fv1/images/generations",
    ],
)
def test_the_open_prefix_is_no_way_around_the_key(path: str) -> None:
    with in_process_api(config=dataclasses.replace(CONFIG, api_key=KEY)) as api:
        answer = call_raw(api.client.app, path)
    assert answer["status"] == 401, answer
    assert b"UNAUTHORIZED" in answer["body"]
