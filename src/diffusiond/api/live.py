"""Waking HTTP handlers when jobs change, and the idempotency keys of POST.

Jobs change on worker threads; handlers wait on the event loop. `JobEvents` bridges the two
without polling: the registry calls `on_change` under its lock (cheap: it only schedules
wake-ups), and each waiting handler holds an `asyncio.Event` for the job it follows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from diffusiond.errors import IdempotencyConflict, InvalidRequest
from diffusiond.jobs.models import GenerationRequest, Job


class JobEvents:
    """Subscriptions to job changes, for server-sent events and `Prefer: wait`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever `job_id` changes, or any job changes status (a queue
        position may have moved), or the server closes the streams. Event-loop only."""
        changed = asyncio.Event()
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._waiters.setdefault(job_id, set()).add(changed)
        try:
            yield changed
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(changed)
                    if not waiters:
                        del self._waiters[job_id]

    def on_change(self, before: Job, after: Job) -> None:
        """The registry's listener: runs on any thread, under the registry's lock."""
        with self._lock:
            if self._loop is None or not self._waiters:
                return
            if before.status is after.status:
                targets = list(self._waiters.get(after.id, ()))
            else:
                targets = [event for events in self._waiters.values() for event in events]
            loop = self._loop
        if targets:
            with suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_set_all, targets)

    def close(self) -> None:
        """End every stream (at shutdown): waiters see `closed` once woken."""
        with self._lock:
            self._closed = True
            targets = [event for events in self._waiters.values() for event in events]
            loop = self._loop
        if targets and loop is not None:
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_all, targets)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


MAX_KEY_LENGTH = 255


def check_idempotency_key(raw: str) -> str:
    """1-255 visible ASCII characters, as the header's rule says."""
    rule = f"1 to {MAX_KEY_LENGTH} visible ASCII characters"
    if not 1 <= len(raw) <= MAX_KEY_LENGTH or not all("!" <= c <= "~" for c in raw):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise InvalidRequest(
            f"the Idempotency-Key header must be {rule}, got {shown!r} ({len(raw)} characters)",
            field="Idempotency-Key",
            rule=rule,
        )
    return raw


@dataclass(frozen=True)
class _Seen:
    request: GenerationRequest
    job_id: str


class IdempotencyKeys:
    """Which job each Idempotency-Key started, while that job is still kept.

    A key is answered from here as long as its job exists: the registry deletes terminal
    jobs after the TTL (or evicts them past the byte cap), and the key goes with the job.
    Keys live in memory, so a restart forgets them.
    """

    def __init__(self, exists: Callable[[str], bool], *, max_keys: int = 10_000) -> None:
        self._exists = exists
        self._max_keys = max_keys
        self._seen: dict[str, _Seen] = {}

    def replay(self, key: str, request: GenerationRequest) -> str | None:
        """The id of the job this key started with the same request; None if unseen.

        Raises `IdempotencyConflict` when the key started a job with a different request.
        """
        seen = self._seen.get(key)
        if seen is None:
            return None
        if not self._exists(seen.job_id):
            del self._seen[key]
            return None
        if seen.request != request:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used for generation {seen.job_id} "
                "with a different request body",
                details={"id": seen.job_id},
            )
        return seen.job_id

    def remember(self, key: str, request: GenerationRequest, job_id: str) -> None:
        if len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if self._exists(v.job_id)}
            while len(self._seen) >= self._max_keys:  # still full: forget the oldest
                del self._seen[next(iter(self._seen))]
        self._seen[key] = _Seen(request, job_id)
