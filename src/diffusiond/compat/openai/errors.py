"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
statuses the OpenAI SDKs map to their exception classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 409 ConflictError, 413, 429 RateLimitError, 5xx
InternalServerError). Never a stack trace: an unexpected error is logged and answered 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import orjson
from starlette.requests import Request
from starlette.responses import Response

from diffusiond.errors import (
    AlreadyTerminal,
    DiffusiondError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServerBusy,
    ServerNotReady,
    StoreError,
)
from diffusiond.jobs.models import Job, JobStatus

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"
SERVER = "server_error"
STORE_RETRY_AFTER_S = 5
# The SDKs retry 409 and 5xx unless told not to: a job that failed or was cancelled is
# not worth drawing again unasked.
NO_RETRY = {"x-should-retry": "false"}

# (status, type, code) by error class; looked up along the class's MRO.
_DOMAIN: dict[type[DiffusiondError], tuple[int, str, str]] = {
    InvalidRequest: (400, INVALID, "invalid_value"),
    NotFound: (404, INVALID, "not_found"),
    AlreadyTerminal: (409, INVALID, "already_terminal"),
    PayloadTooLarge: (413, INVALID, "payload_too_large"),
    ServerBusy: (429, "rate_limit_error", "rate_limit_exceeded"),
    ServerNotReady: (503, SERVER, "server_not_ready"),
    StoreError: (503, SERVER, "store_unavailable"),
}


ErrorBody = dict[str, dict[str, object]]


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> ErrorBody:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = orjson.dumps(error_body(message, error_type, param, code))
    return Response(body, status, headers=headers, media_type="application/json")


def unauthorized(message: str) -> Response:
    """The 401 of the API-key check, for a request under /openai/."""
    return error_response(
        401,
        f"{message}: send 'Authorization: Bearer <IMAGE_API_KEY>' (the SDK's api_key)",
        INVALID,
        code="invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer realm="diffusiond"'},
    )


def domain_error_parts(exc: DiffusiondError) -> tuple[int, ErrorBody, dict[str, str]]:
    """Status, body and headers for a domain error."""
    status, error_type, code = 500, SERVER, "internal_error"
    for cls in type(exc).__mro__:
        if cls in _DOMAIN:
            status, error_type, code = _DOMAIN[cls]
            break
    message = exc.message
    headers: dict[str, str] = {}
    if isinstance(exc, ServerBusy):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, StoreError):
        log.error("a store write failed: %s", exc.message)  # the path stays in the log
        message = "the job store could not save the change, which was not made"
        headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
    param = exc.field if isinstance(exc, InvalidRequest) else None
    return status, error_body(message, error_type, param, code), headers


def domain_error(exc: DiffusiondError) -> Response:
    status, body, headers = domain_error_parts(exc)
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def job_error_body(job: Job) -> tuple[int, ErrorBody]:
    """What a job that did not complete answers: 500 with its error, or 409 cancelled."""
    if job.status is JobStatus.CANCELLED:
        message = f"generation {job.id} was cancelled before it finished"
        return 409, error_body(message, INVALID, None, "cancelled")
    message = job.error.message if job.error is not None else "the generation failed"
    code = job.error.code.value.lower() if job.error is not None else "generation_failed"
    return 500, error_body(f"generation {job.id} failed: {message}", SERVER, None, code)


def job_error(job: Job) -> Response:
    status, body = job_error_body(job)
    return Response(orjson.dumps(body), status, headers=NO_RETRY, media_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]


def answers_in_openai_shape(handler: Handler) -> Handler:
    """`handler`, with every error it raises answered in OpenAI's shape."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except DiffusiondError as exc:
            return domain_error(exc)
        except Exception as exc:
            log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
            return error_response(500, "internal server error; see the server log", SERVER)

    return guarded
