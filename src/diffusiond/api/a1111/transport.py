"""What the /sdapi/v1 routes share with HTTP: A1111's error shape, the body limit, and
the two waits (one of several events; the client hanging up)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from diffusiond.errors import (
    DiffusiondError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServerBusy,
)

log = logging.getLogger(__name__)


class JobFailed(DiffusiondError):
    """A job of the call ended in error; its message is the job's."""


_STATUS = {InvalidRequest: 400, NotFound: 404, PayloadTooLarge: 413, ServerBusy: 503}


def _status_of(exc: DiffusiondError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 503 if type(exc).__name__ in ("ServerNotReady", "StoreError") else 500


def answer(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers=headers, media_type="application/json")


def a1111_error(exc: DiffusiondError) -> Response:
    """A1111's error shape {"error", "detail", "body", "errors"}, with the field and rule."""
    payload: dict[str, Any] = {
        "error": type(exc).__name__,
        "detail": exc.message,
        "body": "",
        "errors": exc.message,
        **{key: exc.details[key] for key in ("field", "rule") if key in exc.details},
    }
    headers = None
    if isinstance(exc, ServerBusy):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return answer(payload, _status_of(exc), headers)


async def domain_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DiffusiondError)
    return a1111_error(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = "Not Found" if exc.status_code == 404 else str(exc.detail)
    return answer({"detail": detail}, exc.status_code, dict(exc.headers or {}))


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    message = "internal server error; see the server log"
    return answer({"error": "InternalError", "detail": message, "body": "", "errors": message}, 500)


async def first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Until one of the events is set (or `timeout` seconds pass)."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def watch_hang_up(receive: Receive, on_hang_up: Callable[[], None]) -> None:
    """Calls `on_hang_up` when the client disconnects (the body has been read: the server's
    next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_hang_up()
