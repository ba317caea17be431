"""Domain errors. They carry no HTTP: api/errors.py maps each class to a status and code."""

from __future__ import annotations

from typing import Any


class DiffusiondError(Exception):
    """Root of every error diffusiond raises on purpose."""

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class InvalidRequest(DiffusiondError):
    """A request that breaks a rule of the API; `field` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None) -> None:
        details: dict[str, Any] = {}
        if field is not None:
            details["field"] = field
        if rule is not None:
            details["rule"] = rule
        super().__init__(message, details=details)
        self.field = field


class PayloadTooLarge(DiffusiondError):
    """A request body over the size limit."""


class NotFound(DiffusiondError):
    """An unknown or expired generation id."""


class AlreadyTerminal(DiffusiondError):
    """A state change asked of a job that is already complete, failed or cancelled."""


class IdempotencyConflict(DiffusiondError):
    """An Idempotency-Key already used for a different request body."""


class ServerBusy(DiffusiondError):
    """Every worker is busy and there is no room to wait."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, details={"retryAfterSeconds": retry_after_s})
        self.retry_after_s = retry_after_s


class ServerNotReady(DiffusiondError):
    """The model is still loading, or failed to load."""


class SettingsError(DiffusiondError):
    """A malformed configuration value; the message names the variable or flag."""


class ModelLoadError(DiffusiondError):
    """The model could not be found or loaded; the message names the path and the reason."""


class StoreError(DiffusiondError):
    """The job store could not write a change; memory was left as the store has it."""


class TooManyStreams(ServerBusy):
    """Every slot for event streams and `Prefer: wait` requests is held."""
