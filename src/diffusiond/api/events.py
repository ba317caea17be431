"""Live job state over HTTP: wake-ups on change, the event stream and `Prefer: wait`.

Jobs change on worker threads (or, in broker mode, on the bridge loop); handlers wait on
the event loop. `JobEvents` bridges the two without polling: the registry calls
`on_change` under its lock (cheap: it only schedules wake-ups), and each waiting handler
holds an `asyncio.Event` for the job it follows. `JobFeed` turns those wake-ups into a
server-sent event stream and into the wait of `Prefer: wait=N`; `EventPacer` is the rule
that keeps a stream to at most ten progress events a second.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress

from starlette.requests import Request

from diffusiond.api.params import read_uint
from diffusiond.api.ports import JobSource, Offload
from diffusiond.errors import NotFound
from diffusiond.jobs.models import Job, JobChanged

MAX_WAIT_S = 60  # the longest `Prefer: wait=N` honoured
HEARTBEAT = b": heartbeat\n\n"

Clock = Callable[[], float]


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
        """An event set whenever `job_id` changes or is deleted, or any job changes status
        (a queue position may have moved), or the server closes the streams. Event-loop
        only."""
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

    def on_change(self, change: JobChanged) -> None:
        """The registry's listener: runs on any thread, under the registry's lock."""
        with self._lock:
            if self._loop is None or not self._waiters:
                return
            if change.status_changed:
                targets = [event for events in self._waiters.values() for event in events]
            else:
                targets = list(self._waiters.get(change.job_id, ()))
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


class EventPacer:
    """At most one progress event per `interval_s` on one stream.

    The stream asks `delay_s()` before a progress event: while it is above zero the event
    is held back (and a newer state may replace it). A final event does not ask.
    """

    def __init__(self, interval_s: float, clock: Clock = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._sent_at = -math.inf

    def delay_s(self) -> float:
        """Seconds until a progress event may go out; 0 when it may go now."""
        return max(0.0, self._sent_at + self._interval_s - self._clock())

    def sent(self) -> None:
        self._sent_at = self._clock()


def sse_event(event_id: int, name: str, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, name.encode(), data)


def last_event_id(request: Request) -> int | None:
    """The `Last-Event-ID` a reconnecting client sends; None when absent or not one of the
    ids this server sends (ASCII digits): the stream then starts from the job's state now,
    as for a first connection, rather than refusing the client."""
    return read_uint(request.headers.get("last-event-id", "").strip())


def wait_preference(request: Request) -> int | None:
    """N of `Prefer: wait=N` (RFC 7240), at most MAX_WAIT_S; None when absent or malformed
    (a preference a server cannot read is one it may ignore)."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.strip().partition("=")
            seconds = read_uint(value.strip())
            if name.strip().lower() == "wait" and seconds is not None:
                return min(seconds, MAX_WAIT_S)
    return None


class JobFeed:
    """One job's changes as they happen: an event stream, or a wait for its end."""

    def __init__(
        self,
        registry: JobSource,
        events: JobEvents,
        *,
        render: Callable[[Job], bytes],
        queue_position: Callable[[str], int | None],
        heartbeat_s: float,
        event_interval_s: float,
        clock: Clock = time.monotonic,
        offload: Offload | None = None,
    ) -> None:
        self._registry = registry
        self._events = events
        self._render = render
        self._queue_position = queue_position
        self._heartbeat_s = heartbeat_s
        self._event_interval_s = event_interval_s
        self._clock = clock
        self._offload = offload if offload is not None else Offload()  # see api/ports.py

    async def wait_terminal(self, job: Job, wait_s: float) -> Job:
        """The job once terminal, or as it is after `wait_s` seconds; woken by changes."""
        deadline = asyncio.get_running_loop().time() + wait_s
        with self._events.subscribe(job.id) as changed:
            while True:
                changed.clear()
                job = await self._offload(self._registry.get, job.id)
                left = deadline - asyncio.get_running_loop().time()
                if job.status.is_terminal() or left <= 0 or self._events.closed:
                    return job
                with suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)

    async def stream(self, job_id: str, last_id: int | None) -> AsyncIterator[bytes]:
        """`progress` events while the job moves, then its final event, then the end.

        Each event carries the body a GET would return and the job's version as its id; a
        client resuming with Last-Event-ID gets only newer states, and always the final one.
        Progress events are paced by an `EventPacer` (the newest state is sent; the ones in
        between are skipped); the final event is never held back.
        """
        pacer = EventPacer(self._event_interval_s, self._clock)
        sent: tuple[int, int | None] | None = None
        with self._events.subscribe(job_id) as changed:
            while not self._events.closed:
                changed.clear()
                try:
                    job = await self._offload(self._registry.get, job_id)
                except NotFound:
                    return  # evicted or expired while followed: nothing more to say
                if job.status.is_terminal():
                    body = await self._offload(self._render, job)
                    yield sse_event(job.version, job.status.value, body)
                    return
                position = await self._offload(self._queue_position, job_id)
                resumed = last_id is not None and sent is None and job.version <= last_id
                if not resumed and sent != (job.version, position):
                    early = pacer.delay_s()
                    if early > 0:  # too soon after the last event: wait, unless it ends
                        with suppress(TimeoutError):
                            await asyncio.wait_for(changed.wait(), early)
                        continue
                    yield sse_event(job.version, "progress", await self._offload(self._render, job))
                    sent = (job.version, position)
                    pacer.sent()
                elif resumed:
                    sent = (job.version, position)
                try:
                    await asyncio.wait_for(changed.wait(), self._heartbeat_s)
                except TimeoutError:
                    yield HEARTBEAT
