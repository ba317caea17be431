"""Credentials never leave in a message: the URL helper, the text scanner and the log filter."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from diffusiond.logs import configure_logging
from diffusiond.redaction import redact_text, redact_url

SECRET = "s3cr3t-PW"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis://:{SECRET}@db.example:6379/0", "redis://:***@db.example:6379/0"),
        (f"redis://alice:{SECRET}@db.example/1", "redis://alice:***@db.example/1"),
        (f"rediss://{SECRET}@db.example/0", "rediss://***@db.example/0"),
        (f"redis://:p@ss:{SECRET}@db.example/0", "redis://:***@db.example/0"),
        (f"redis://db.example/0?password={SECRET}", "redis://db.example/0?password=***"),
        (
            f"redis://db.example/0?db=1&Password={SECRET}&ssl=true",
            "redis://db.example/0?db=1&Password=***&ssl=true",
        ),
        (f"unix://:{SECRET}@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("", ""),
    ],
)
def test_redact_url_masks_passwords_and_keeps_the_rest(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert SECRET not in redact_text(f"connecting to {url} failed")


def test_redact_text_finds_urls_inside_any_message() -> None:
    message = (
        f"the broker (--broker redis://:{SECRET}@10.0.0.5/0) is unreachable; "
        f"also tried 'rediss://bob:{SECRET}@backup/2' and redis://h/0?db=0&password={SECRET}"
    )
    redacted = redact_text(message)
    assert SECRET not in redacted
    assert "redis://:***@10.0.0.5/0" in redacted
    assert "'rediss://bob:***@backup/2'" in redacted
    assert "redis://h/0?db=0&password=***" in redacted


def test_redact_text_masks_passwords_a_library_prints() -> None:
    shown = redact_text(f"Connection(host=db,port=6379,password={SECRET},db=0) password={SECRET}")
    assert shown == "Connection(host=db,port=6379,password=***,db=0) password=***"


def test_redact_text_leaves_ordinary_text_alone() -> None:
    for text in ("job gen_1_a complete", "mail me at alice@example.org", "a=b&c=d", "x @ y"):
        assert redact_text(text) == text


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """configure_logging's handler, writing to a buffer; the root logger restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("info", as_json=True)
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_every_log_record_is_scrubbed_whoever_logs_it(log_output: io.StringIO) -> None:
    url = f"redis://:{SECRET}@db.example/0"
    third_party = logging.getLogger("some.library")
    third_party.warning("reconnecting to %s", url)  # in the arguments
    third_party.error(f"cannot use {url}")  # in the message itself
    try:
        raise ConnectionError(f"Error connecting to {url}")
    except ConnectionError:
        third_party.exception("lost %s", "the broker")  # in the traceback
    logging.getLogger("uvicorn.error").info("url=%r", {"broker": url})
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    assert len(lines) == 4
    assert SECRET not in log_output.getvalue()
    assert lines[0]["message"] == "reconnecting to redis://:***@db.example/0"
    assert "redis://:***@db.example/0" in lines[2]["exception"]
