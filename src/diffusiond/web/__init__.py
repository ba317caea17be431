"""The browser page: static files shipped in the package, served at / and under /ui/.

The page holds no data of its own: every call it makes to the API carries the key, so these
paths are open without it (see api/security.py).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
UI_PREFIX = "/ui/"

# The page loads only its own files; images are blob: URLs, previews data: URLs.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _index(_request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_HEADERS)


def web_routes() -> list[BaseRoute]:
    """`/` (the page) and `/ui/...` (its script and style sheet)."""
    return [
        Route("/", _index, methods=["GET", "HEAD"]),
        Mount(UI_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="ui"),
    ]
