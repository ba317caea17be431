"""Typed client errors, one per API error code (and for how a generation ended)."""

from __future__ import annotations

import builtins
from typing import Any


class DiffusiondClientError(Exception):
    """Root of every error the client raises; `code` is the API's error code."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        status: int | None = None,
        details: dict[str, Any] | None = None,
        suggestion: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.details: dict[str, Any] = details or {}
        self.suggestion = suggestion


class InvalidRequestError(DiffusiondClientError):
    """400: the request broke a rule; `field` names the field (when one is to blame)."""

    @property
    def field(self) -> str | None:
        value = self.details.get("field")
        return value if isinstance(value, str) else None


class UnauthorizedError(DiffusiondClientError):
    """401: the server wants an API key (IMAGE_API_KEY) and this one is missing or wrong."""


class NotFoundError(DiffusiondClientError):
    """404: the generation id is unknown, or its result expired."""


class AlreadyTerminalError(DiffusiondClientError):
    """409: the generation already ended (complete or error)."""


class ServerBusyError(DiffusiondClientError):
    """503: every worker is busy; retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerNotReadyError(DiffusiondClientError):
    """503: the server is still loading its model (or failed to)."""


class ServerError(DiffusiondClientError):
    """Any other error answer (5xx, unknown codes)."""


class UnsafeAnswerError(DiffusiondClientError):
    """The server answered something the client refuses to use (an id that could name a
    path outside the output folder, a seed that is not a number): a broken or hostile
    server."""


class ConnectionError(DiffusiondClientError, builtins.ConnectionError):
    """No server answered at the URL."""


class GenerationFailedError(DiffusiondClientError):
    """The generation ended in `error`; `code` and `message` are what the server stored."""


class GenerationCancelledError(DiffusiondClientError):
    """The generation was cancelled (by this client or another)."""


class GenerationTimeoutError(DiffusiondClientError, builtins.TimeoutError):
    """The caller's timeout passed; the generation was cancelled on the server."""
