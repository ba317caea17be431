"""Logging set-up: readable lines for people, one JSON object per line for machines."""

from __future__ import annotations

import json
import logging
import time

from diffusiond.redaction import redact_text

# Fields a log call may attach with `extra=` that belong in the JSON object.
_EXTRA_FIELDS = ("job", "status", "durationMs", "errorCode")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RedactingFilter(logging.Filter):
    """Masks credentials (diffusiond.redaction) in every record's message, arguments and
    exception text, whichever library logged it: no log line carries a password."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad arguments: left to the handler to report
            return True
        redacted = redact_text(message)
        if redacted != message:  # formatted once here, so args cannot bring it back
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def configure_logging(level: str, *, as_json: bool) -> None:
    """Route every logger (uvicorn's too) to one stderr handler in the chosen format, every
    record scrubbed of credentials on the way."""
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
