"""Access control: a bearer API key on every endpoint but /health and the web page's files."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from diffusiond.api.errors import error_response

OPEN_PATHS = frozenset({"/health", "/"})
# The web page's script and style sheet: they hold no data, and every API call the page makes
# carries the key (it asks for it on the first 401).
OPEN_PREFIXES = ("/ui/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class BearerKeyMiddleware:
    """Answers 401 UNAUTHORIZED unless `Authorization: Bearer <key>` matches.

    The key is compared in constant time (hmac.compare_digest), so the time a wrong key
    takes tells nothing about how much of it was right.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self._app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self._expected):
            await self._app(scope, receive, send)
            return
        message = "a valid API key is required" if given else "an API key is required"
        response = error_response(
            401,
            "UNAUTHORIZED",
            message,
            suggestion="Send the header 'Authorization: Bearer <IMAGE_API_KEY>'.",
            headers={"WWW-Authenticate": 'Bearer realm="diffusiond"'},
        )
        await response(scope, receive, send)
