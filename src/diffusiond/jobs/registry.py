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

from diffusiond.errors import AlreadyTerminal, NotFound
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
    """

    def __init__(
        self,
        *,
        ttl_ms: int,
        store: JobStore | None = None,
        clock: Clock = wall_clock_ms,
        id_factory: Callable[[int], str] = new_generation_id,
        max_result_bytes: int = 0,
    ) -> None:
        self._ttl_ms = ttl_ms
        self._store: JobStore = store if store is not None else MemoryStore()
        self._clock = clock
        self._new_id = id_factory
        self._max_result_bytes = max_result_bytes
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        # Bytes of each complete job's images, in the order the jobs completed.
        self._result_bytes: OrderedDict[str, int] = OrderedDict()
        completed = [job for job in self._store.oldest_first() if job.result is not None]
        for job in sorted(completed, key=lambda job: job.updated_at):
            self._result_bytes[job.id] = _size(job)

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
            self._store.put(job)
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
        """Jobs newest first, only those in `statuses` when given, at most `limit`."""
        found: list[Job] = []
        with self._lock:
            for job in self._store.newest_first():
                if limit is not None and len(found) >= limit:
                    break
                if statuses is None or job.status in statuses:
                    found.append(job)
        return found

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
                    self._apply(job, JobStatus.ERROR, {"error": error, "progress": None})
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
            done = self._apply(job, JobStatus.COMPLETE, {"result": result, "progress": None})
            self._result_bytes[job_id] = _size(done)
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
            return self._apply(job, JobStatus.CANCELLED, {"progress": None})

    def cleanup(self) -> int:
        """Delete terminal jobs whose TTL since their last change has passed; never others."""
        with self._lock:
            now = self._clock()
            expired = [
                job.id
                for job in self._store.newest_first()
                if job.status.is_terminal() and now - job.updated_at >= self._ttl_ms
            ]
            for job_id in expired:
                self._forget(job_id)
        if expired:
            log.debug("ttl sweep removed %d job(s)", len(expired))
        return len(expired)

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
            return self._apply(job, target, changes(job), durable=durable)

    def _forget(self, job_id: str) -> bool:
        self._result_bytes.pop(job_id, None)
        deleted = self._store.delete(job_id)
        if deleted:
            self._notify(JobChanged(job_id, deleted=True))
        return deleted

    def _notify(self, change: JobChanged) -> None:
        for listener in self._listeners:
            listener(change)

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
    return sum(len(image.png) for image in job.result.images) if job.result is not None else 0


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
        self._interval_s = interval_ms / 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttl-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._registry.cleanup()
            except Exception:  # a sweep that fails must not end the sweeping
                log.exception("ttl sweep failed")
