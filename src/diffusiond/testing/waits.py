"""Waiting for a condition without a hand-written deadline loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class NeverHappened(AssertionError):
    """The condition did not hold within the time given."""


def eventually(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "",
) -> T:
    """The first truthy value of `predicate()`, called every `interval` seconds.

    Raises `NeverHappened` (an AssertionError, so tests fail plainly) once `timeout`
    seconds have passed; `message` (or what it returns) says what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            said = message() if callable(message) else message
            raise NeverHappened(f"not within {timeout:g} s: {said or predicate!r}")
        time.sleep(min(interval, left))
