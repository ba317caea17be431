"""Rendered JSON bodies of jobs, kept so that many readers cost one rendering per change."""

from __future__ import annotations

import threading
from collections import OrderedDict

from diffusiond.api.schemas import dump, job_body
from diffusiond.jobs.models import Job, JobChanged

# The most bytes of rendered bodies kept: a finished 5-image 512x512 job renders to about
# 4.4 MB, so this holds a dozen such results (or thousands of small or live ones).
MAX_RENDERED_BYTES = 64 * 1024 * 1024

_Key = tuple[int, int | None]  # the job's version and its queue position


class RenderedBodies:
    """The body a GET returns, per job, rendered once per change of the job.

    A terminal job's body never changes (its base64 and JSON happen once); a live job's is
    kept until its next change (version) or queue move. The least recently read bodies go
    first once the total passes `max_bytes` (the newest body is always kept), and a job's
    body goes as soon as its registry reports the job deleted.
    """

    def __init__(self, max_bytes: int = MAX_RENDERED_BYTES) -> None:
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # deletions are reported on the registry's threads
        self._bodies: OrderedDict[str, tuple[_Key, bytes]] = OrderedDict()
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._bodies

    def render(self, job: Job, queue_position: int | None = None) -> bytes:
        key = (job.version, queue_position)
        with self._lock:
            kept = self._bodies.get(job.id)
            if kept is not None and kept[0] == key:
                self._bodies.move_to_end(job.id)
                return kept[1]
        body = dump(job_body(job, queue_position))
        with self._lock:
            self._drop(job.id)
            self._bodies[job.id] = (key, body)
            self._total_bytes += len(body)
            while self._total_bytes > self._max_bytes and len(self._bodies) > 1:
                self._drop(next(iter(self._bodies)))
        return body

    def on_change(self, change: JobChanged) -> None:
        """The registry's listener: a deleted job's body goes with it."""
        if change.deleted:
            with self._lock:
                self._drop(change.job_id)

    def _drop(self, job_id: str) -> None:
        kept = self._bodies.pop(job_id, None)
        if kept is not None:
            self._total_bytes -= len(kept[1])
