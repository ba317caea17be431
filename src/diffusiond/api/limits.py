"""How many event streams and `Prefer: wait` requests may be open at once.

Each one holds a connection and a subscription for as long as its job runs (minutes), so
without a bound a client could open them until memory or file descriptors run out. Past
the limit the server answers 503 SERVER_BUSY with Retry-After, before anything starts.
Used on the event loop only, so a plain counter is enough.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffusiond.errors import TooManyStreams

RETRY_AFTER_S = 5  # streams end with their job: seconds, not milliseconds, free one


class StreamSlots:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open = 0

    @property
    def open(self) -> int:
        return self._open

    def take(self) -> None:
        """Hold one slot; `ServerBusy` when all are held. Pair with `give_back`."""
        if self._open >= self._limit:
            raise TooManyStreams(
                f"{self._open} event streams and Prefer: wait requests are open, this "
                "server's limit (DIFFUSIOND_MAX_STREAMS)",
                retry_after_s=RETRY_AFTER_S,
            )
        self._open += 1

    def give_back(self) -> None:
        self._open -= 1

    @contextmanager
    def held(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.give_back()
