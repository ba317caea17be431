"""The one place where errors become HTTP: each error class maps to a status and a code."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from diffusiond.api.schemas import dump
from diffusiond.errors import (
    AlreadyTerminal,
    DiffusiondError,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServerBusy,
    ServerNotReady,
    StoreError,
    TooManyStreams,
)

log = logging.getLogger(__name__)

# (status, code, suggestion) by error class; looked up along the class's MRO.
_DOMAIN_ERRORS: dict[type[DiffusiondError], tuple[int, str, str | None]] = {
    InvalidRequest: (400, "INVALID_REQUEST", None),
    NotFound: (404, "NOT_FOUND", "The id is unknown, or the result expired after its TTL."),
    AlreadyTerminal: (409, "ALREADY_TERMINAL", None),
    IdempotencyConflict: (
        409,
        "IDEMPOTENCY_CONFLICT",
        "Use a new Idempotency-Key for a different request, or resend the same body.",
    ),
    PayloadTooLarge: (413, "PAYLOAD_TOO_LARGE", None),
    ServerBusy: (
        503,
        "SERVER_BUSY",
        "Every worker is busy: retry after the number of seconds in Retry-After.",
    ),
    ServerNotReady: (503, "SERVER_NOT_READY", "Retry once GET /health answers 200."),
    TooManyStreams: (
        503,
        "SERVER_BUSY",
        "Too many event streams and waits are open: poll instead, or retry after the "
        "number of seconds in Retry-After.",
    ),
    StoreError: (
        503,
        "STORE_UNAVAILABLE",
        "The server could not save the job (its disk or database failed): retry after "
        "the number of seconds in Retry-After.",
    ),
}

STORE_RETRY_AFTER_S = 5


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    suggestion: str | None = None,
    details: dict[str, object] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    error: dict[str, object] = {"message": message, "code": code}
    if suggestion:
        error["suggestion"] = suggestion
    if details:
        error["details"] = details
    return Response(dump({"error": error}), status, headers=headers, media_type="application/json")


def _mapping_for(exc: DiffusiondError) -> tuple[int, str, str | None]:
    for cls in type(exc).__mro__:
        if cls in _DOMAIN_ERRORS:
            return _DOMAIN_ERRORS[cls]
    return 500, "INTERNAL_ERROR", None


async def domain_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DiffusiondError)
    status, code, suggestion = _mapping_for(exc)
    headers = None
    message = exc.message
    if isinstance(exc, ServerBusy):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, StoreError):
        # What failed (a path, a database message) goes to the log, not to the client.
        log.error("a store write failed: %s", exc.message)
        message = "the job store could not save the change, which was not made"
        headers = {"Retry-After": str(STORE_RETRY_AFTER_S)}
    return error_response(
        status, code, message, suggestion=suggestion, details=exc.details, headers=headers
    )


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(
            404,
            "ROUTE_NOT_FOUND",
            f"no endpoint at {request.url.path}",
            suggestion="Endpoints live under /v1/images/generations and /health.",
        )
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error_response(
            405,
            "METHOD_NOT_ALLOWED",
            f"{request.method} is not allowed on {request.url.path}",
            suggestion=f"Allowed: {allowed}." if allowed else None,
            headers=exc.headers,
        )
    return error_response(exc.status_code, "INVALID_REQUEST", str(exc.detail))


async def internal_error(request: Request, exc: Exception) -> Response:
    # The trace goes to the log, never into the response.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "INTERNAL_ERROR", "internal server error; see the server log")
