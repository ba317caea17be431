"""The generation registry: the only place a job's state changes, thread-safe, with a TTL."""

from __future__ import annotations

import builtins
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

from diffusiond.errors import AlreadyTerminal, NotFound, StoreError
from diffusiond.jobs.ids import new_generation_id
from diffusiond.jobs.models import (
    ErrorCode,
    GenerationRequest,
    Job,
    JobChanged,
    JobError,
    JobListener,
    JobStatus,
    Progress,
    Result,
)
from diffusiond.jobs.store import JobStore, MemoryStore

log = logging.getLogger(__name__)

Clock = Callable[[], int]

DEFAULT_MAX_JOBS = 1000  # IMAGE_MAX_JOBS
# Jobs the TTL sweep deletes per hold of the lock: a GET waits for one batch at most.
SWEEP_BATCH = 64


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class GenerationRegistry:
    """Creates jobs and moves them through their lifecycle.

    Every change goes through a named method that checks the transition table; a change
    asked of a terminal job raises `AlreadyTerminal`, so nothing can resurrect a finished,
    failed or cancelled job. Percentages never decrease while a job runs.

    With `max_result_bytes`, the PNG bytes of complete jobs are capped: past the cap the
    jobs that completed first are deleted first (their GET answers 404, as if expired). The
    newest result is always kept, even when it alone is over the cap.

    At most `max_jobs` jobs are kept: past it, creating a job drops the terminal jobs that
    ended first (their GET answers 404). Pending and running jobs are never dropped, so
    more of them than `max_jobs` are all kept (admission bounds how many there are).

    A store write that fails raises `StoreError` and leaves memory as the store has it: a
    job is only registered once it is saved, and a result that cannot be saved ends the
    job as `error`/`IO_ERROR` when that at least can be saved.
    """

    def __init__(
        self,
        *,
        ttl_ms: int,
        store: JobStore | None = None,
        clock: Clock = wall_clock_ms,
        id_factory: Callable[[int], str] = new_generation_id,
        max_result_bytes: int = 0,
        max_jobs: int = DEFAULT_MAX_JOBS,
    ) -> None:
        self._ttl_ms = ttl_ms
        self._store: JobStore = store if store is not None else MemoryStore()
        self._clock = clock
        self._new_id = id_factory
        self._max_result_bytes = max_result_bytes
        self._max_jobs = max_jobs
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        # Bytes of each complete job's images, in the order the jobs completed.
        self._result_bytes: OrderedDict[str, int] = OrderedDict()
        completed = [job for job in self._store.oldest_first() if job.result is not None]
        for job in sorted(completed, key=lambda job: job.updated_at):
            self._result_bytes[job.id] = _size(job)
        # Ids of terminal jobs in the order they ended: the first to drop past max_jobs.
        self._ended: OrderedDict[str, None] = OrderedDict()
        ended = [job for job in self._store.oldest_first() if job.status.is_terminal()]
        for job in sorted(ended, key=lambda job: job.updated_at):
            self._ended[job.id] = None

    def add_listener(self, listener: JobListener) -> None:
        """Call `listener(JobChanged(...))` on every change and deletion, in order, under
        the registry's lock: it must be quick and must not call back into the registry."""
        self._listeners.append(listener)

    def create(self, request: GenerationRequest) -> Job:
        with self._lock:
            now = self._clock()
            job_id = self._new_id(now)
            while self._store.get(job_id) is not None:
                job_id = self._new_id(now)
            job = Job(
                id=job_id,
                request=request,
                status=JobStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
            self._store.put(job)  # raises StoreError before anything is registered
            self._drop_over_max_jobs()
        _log_transition(job, 0)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._store.get(job_id)
        if job is None:
            raise NotFound(f"no generation with id {job_id!r} (unknown or expired)")
        return job

    def exists(self, job_id: str) -> bool:
        with self._lock:
            return self._store.get(job_id) is not None

    def list(
        self, statuses: Collection[JobStatus] | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """Jobs newest first, only those in `statuses` when given, at most `limit`.

        Only the copy of the store's order is made under the lock; the filter runs outside
        it, so a listing of many jobs does not hold up the GETs waiting on the lock.
        """
        with self._lock:
            snapshot = list(self._store.newest_first())
        if statuses is not None:
            snapshot = [job for job in snapshot if job.status in statuses]
        return snapshot if limit is None else snapshot[:limit]

    def delete(self, job_id: str) -> bool:
        with self._lock:
            return self._forget(job_id)

    def recover(self) -> builtins.list[Job]:
        """After a restart: end jobs that were running, return the pending ones, oldest first.

        A job that was `in_progress` when the server stopped cannot be resumed (its
        generation state died with the process): it ends as `error`/`SERVER_RESTARTED`.
        """
        error = JobError(
            "The server restarted while this generation was running; submit it again.",
            ErrorCode.SERVER_RESTARTED,
        )
        with self._lock:
            jobs = list(self._store.oldest_first())
            for job in jobs:
                if job.status is JobStatus.IN_PROGRESS:
                    ended = self._apply(job, JobStatus.ERROR, {"error": error, "progress": None})
                    self._note_end(ended)
        return [job for job in jobs if job.status is JobStatus.PENDING]

    def result_bytes(self) -> int:
        with self._lock:
            return sum(self._result_bytes.values())

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def start(self, job_id: str) -> Job:
        return self._transition(job_id, JobStatus.IN_PROGRESS)

    def report_progress(self, job_id: str, progress: Progress) -> Job:
        def keep_rising(job: Job) -> dict[str, Any]:
            update = progress
            previous = job.progress
            if previous is not None:
                if update.percentage < previous.percentage:
                    update = dataclasses.replace(update, percentage=previous.percentage)
                # The last preview of this image stays until a newer one replaces it.
                if (
                    update.preview is None
                    and previous.preview is not None
                    and previous.current_image == update.current_image
                ):
                    update = dataclasses.replace(update, preview=previous.preview)
            return {"progress": update}

        return self._transition(job_id, JobStatus.IN_PROGRESS, keep_rising, durable=False)

    def complete(self, job_id: str, result: Result) -> Job:
        with self._lock:
            job = self._require(job_id)
            try:
                done = self._apply(job, JobStatus.COMPLETE, {"result": result, "progress": None})
            except StoreError as exc:
                self._end_unsaved(job, exc)
                raise
            self._result_bytes[job_id] = _size(done)
            self._note_end(done)
            self._evict_over_budget()
        return done

    def fail(self, job_id: str, error: JobError) -> Job:
        return self._transition(
            job_id, JobStatus.ERROR, lambda _: {"error": error, "progress": None}
        )

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job; cancelling a cancelled job is a no-op."""
        with self._lock:
            job = self._require(job_id)
            if job.status is JobStatus.CANCELLED:
                return job
            return self._note_end(self._apply(job, JobStatus.CANCELLED, {"progress": None}))

    def cleanup(self) -> int:
        """Delete terminal jobs whose TTL since their last change has passed; never others.

        The expired jobs are picked from a copy, outside the lock, and deleted in batches of
        SWEEP_BATCH, the lock released between batches. A terminal job never changes, so one
        picked as expired stays expired; one deleted meanwhile is skipped.
        """
        with self._lock:
            now = self._clock()
            snapshot = list(self._store.oldest_first())
        expired = [
            job.id
            for job in snapshot
            if job.status.is_terminal() and now - job.updated_at >= self._ttl_ms
        ]
        removed = 0
        for start in range(0, len(expired), SWEEP_BATCH):
            with self._lock:
                for job_id in expired[start : start + SWEEP_BATCH]:
                    removed += self._forget(job_id)
        if removed:
            log.debug("ttl sweep removed %d job(s)", removed)
        return removed

    def _transition(
        self,
        job_id: str,
        target: JobStatus,
        changes: Callable[[Job], dict[str, Any]] = lambda _: {},
        *,
        durable: bool = True,
    ) -> Job:
        with self._lock:
            job = self._require(job_id)
            return self._note_end(self._apply(job, target, changes(job), durable=durable))

    def _forget(self, job_id: str) -> bool:
        existed = self._store.delete(job_id)  # first: a failed delete keeps the accounting
        self._result_bytes.pop(job_id, None)
        self._ended.pop(job_id, None)
        if existed:
            self._notify(JobChanged(job_id, deleted=True))
        return existed

    def _notify(self, change: JobChanged) -> None:
        for listener in self._listeners:
            listener(change)

    def _note_end(self, job: Job) -> Job:
        if job.status.is_terminal():
            self._ended[job.id] = None
        return job

    def _drop_over_max_jobs(self) -> None:
        """Drop the terminal jobs that ended first while more than max_jobs are kept."""
        while len(self._store) > self._max_jobs and self._ended:
            job_id = next(iter(self._ended))
            self._forget(job_id)
            log.info(
                "job %s dropped: more than IMAGE_MAX_JOBS=%d jobs",
                job_id,
                self._max_jobs,
                extra={"job": job_id, "status": "evicted"},
            )

    def _end_unsaved(self, job: Job, failure: StoreError) -> None:
        """A result that could not be saved: end the job as an error, if that saves."""
        log.error("job %s: its result could not be saved: %s", job.id, failure.message)
        error = JobError(
            f"The generation finished but its result could not be saved: {failure.message}",
            ErrorCode.IO_ERROR,
        )
        try:
            self._note_end(self._apply(job, JobStatus.ERROR, {"error": error, "progress": None}))
        except StoreError as again:
            # Memory keeps what the store has (running); a restart ends it SERVER_RESTARTED.
            log.error("job %s: its failure could not be saved either: %s", job.id, again.message)

    def _evict_over_budget(self) -> None:
        """Delete the earliest-completed results until under budget; keep the newest."""
        if not self._max_result_bytes:
            return
        total = sum(self._result_bytes.values())
        while total > self._max_result_bytes and len(self._result_bytes) > 1:
            job_id, size = next(iter(self._result_bytes.items()))
            self._forget(job_id)
            total -= size
            log.info(
                "job %s evicted: results over IMAGE_MAX_RESULT_BYTES=%d",
                job_id,
                self._max_result_bytes,
                extra={"job": job_id, "status": "evicted"},
            )

    def _require(self, job_id: str) -> Job:
        job = self._store.get(job_id)
        if job is None:
            raise NotFound(f"no generation with id {job_id!r} (unknown or expired)")
        return job

    def _apply(
        self, job: Job, target: JobStatus, changes: dict[str, Any], *, durable: bool = True
    ) -> Job:
        if not job.status.can_become(target):
            raise AlreadyTerminal(
                f"generation {job.id} is already {job.status.value}; it cannot become "
                f"{target.value}"
            )
        # updatedAt never goes back, even if the wall clock does.
        now = max(self._clock(), job.updated_at)
        if job.status is JobStatus.PENDING and target is JobStatus.IN_PROGRESS:
            changes = {**changes, "started_at": now}
        updated = dataclasses.replace(
            job, status=target, updated_at=now, version=job.version + 1, **changes
        )
        if durable or target is not job.status:
            self._store.put(updated)
        else:
            self._store.put_progress(updated)
        self._notify(JobChanged(job.id, status_changed=target is not job.status))
        if target is not job.status:
            # Time in the state it left: waiting when it starts, running when it ends.
            since = job.started_at if job.started_at is not None else job.created_at
            _log_transition(updated, now - since)
        return updated


def _size(job: Job) -> int:
    """The bytes a complete job holds: its PNGs, and the input images of an edit."""
    if job.result is None:
        return 0
    edit = job.request.edit
    inputs = 0
    if edit is not None:
        inputs = len(edit.init.data) + (len(edit.mask.data) if edit.mask is not None else 0)
    return inputs + sum(len(image.png) for image in job.result.images)


def _log_transition(job: Job, duration_ms: int) -> None:
    code = job.error.code.value if job.error is not None else None
    log.info(
        "job %s %s duration_ms=%d error_code=%s",
        job.id,
        job.status.value,
        duration_ms,
        code or "-",
        extra={
            "job": job.id,
            "status": job.status.value,
            "durationMs": duration_ms,
            "errorCode": code,
        },
    )


class TtlSweeper:
    """Runs `registry.cleanup()` every `interval_ms` on a daemon thread until stopped."""

    def __init__(self, registry: GenerationRegistry, interval_ms: int) -> None:
        self._registry = registry
        # Event.wait refuses a timeout past TIMEOUT_MAX (settings bound it far below).
        self._interval_s = min(interval_ms / 1000, threading.TIMEOUT_MAX)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttl-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            try:
                if self._stop.wait(self._interval_s):
                    return
                self._registry.cleanup()
            except Exception:  # a sweep (or a wait) that fails must not end the sweeping
                log.exception("ttl sweep failed")
                if self._stop.wait(1.0):  # and must not spin if it fails at once again
                    return
