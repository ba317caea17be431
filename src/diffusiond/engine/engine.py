"""Admission, worker threads, cancel tokens, and the record of how each job ends."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import PurePath

from diffusiond.backends.base import Backend, BackendInfo, GenerationCancelled, ImageSpec
from diffusiond.engine.batch import BatchFailed, Encoder, image_recipe, run_batch
from diffusiond.errors import AlreadyTerminal, NotFound, ServerBusy, ServerNotReady
from diffusiond.imaging import encode_png, encode_preview
from diffusiond.jobs.models import (
    ErrorCode,
    GenerationRequest,
    Job,
    JobError,
    JobStatus,
    Progress,
    Result,
)
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.memory import trim_heap

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class EngineStats:
    running: int
    admitted: int
    max_concurrent: int


def _work_units(request: GenerationRequest) -> int:
    return max(1, request.width * request.height * request.steps * request.count)


class GenerationTimedOut(TimeoutError):
    """The job ran past IMAGE_GENERATION_TIMEOUT_MS; raised at its next step."""


class _Admitted:
    """An admitted job's cancel token and, once it runs, when it started."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.started_at: float | None = None


class Engine:
    """Runs generations on `max_concurrent` worker threads outside the event loop.

    A job is admitted only while fewer than `max_concurrent + max_queue` admitted jobs are
    unfinished; otherwise `submit` raises `ServerBusy`. Admitted jobs run in arrival order.
    Cancelling frees the job's slot at once; the worker stops the generation at its next
    diffusion step.
    """

    def __init__(
        self,
        registry: GenerationRegistry,
        backend: Backend,
        *,
        max_concurrent: int,
        max_queue: int = 0,
        timeout_ms: int = 0,
        encode: Encoder = encode_png,
    ) -> None:
        self._registry = registry
        self._backend = backend
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._timeout_ms = timeout_ms
        self._encode = encode
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a job stops
        self._admitted: dict[str, _Admitted] = {}  # in arrival order
        self._running = 0
        self._draining = False
        self._queue: queue.SimpleQueue[tuple[str, GenerationRequest] | object] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._load_error: str | None = None
        self._ms_per_unit: float | None = None  # the recent pace, for estimates
        self._model_name = "?"
        self._workers = [
            threading.Thread(target=self._work, name=f"generation-worker-{n}", daemon=True)
            for n in range(max_concurrent)
        ]

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def load_model(self) -> None:
        """Load the backend's model (blocking). On failure, remember why and re-raise."""
        started = time.monotonic()
        try:
            self._backend.load()
        except BaseException as exc:
            self._load_error = str(exc) or type(exc).__name__
            raise
        self._model_name = PurePath(self._backend.info().model).name
        self._ready.set()
        log.info("model ready in %.1f s: %s", time.monotonic() - started, self._backend.info())

    def resume(self, pending: list[Job]) -> None:
        """Queue jobs accepted before a restart, ahead of new ones, in their old order."""
        with self._lock:
            for job in pending:
                self._admitted[job.id] = _Admitted()
                self._queue.put((job.id, job.request))
        if pending:
            log.info("resumed %d pending job(s) from the store", len(pending))

    def drain(self, grace_s: float) -> bool:
        """Stop admitting and starting jobs; wait up to `grace_s` for running ones to end.

        Jobs still running after the grace time are cancelled (and waited for, which takes
        at most a diffusion step). Queued jobs stay pending. True if nothing was cancelled.
        """
        with self._lock:
            self._draining = True
            finished = self._changed.wait_for(lambda: self._running == 0, timeout=grace_s)
            if not finished:
                for job_id, admitted in list(self._admitted.items()):
                    if admitted.started_at is not None:
                        admitted.cancelled.set()
                        self._end_quietly(job_id, self._registry.cancel)
                self._changed.wait_for(lambda: self._running == 0, timeout=60)
        return finished

    def shutdown(self, timeout_s: float = 10.0, *, keep_pending: bool = False) -> None:
        """Cancel what runs, stop the workers, and wait for them up to `timeout_s`.

        With `keep_pending` (a persistent store), jobs that have not started stay pending,
        to run after a restart; otherwise they are cancelled too.
        """
        self._stopping.set()
        with self._lock:
            self._draining = True
            for job_id, admitted in self._admitted.items():
                admitted.cancelled.set()
                if admitted.started_at is not None:
                    self._end_quietly(job_id, self._registry.cancel)
            if not keep_pending:
                for job in self._registry.list({JobStatus.PENDING}):
                    self._end_quietly(job.id, self._registry.cancel)
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))

    # -- what the API calls ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def load_error(self) -> str | None:
        return self._load_error

    def info(self) -> BackendInfo:
        return self._backend.info()

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def draining(self) -> bool:
        return self._draining

    def health_extra(self) -> dict[str, object]:
        """Fields /health adds for this engine: none in the single-process mode."""
        return {}

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(self._running, len(self._admitted), self._max_concurrent)

    def queue_position(self, job_id: str) -> int | None:
        """1 for the job that starts next, 2 after it...; None unless it waits its turn."""
        with self._lock:
            position = 0
            for waiting_id, admitted in self._admitted.items():
                if admitted.started_at is None:
                    position += 1
                    if waiting_id == job_id:
                        return position
        return None

    def submit(self, request: GenerationRequest) -> Job:
        if not self._ready.is_set():
            raise ServerNotReady(self._not_ready_message())
        with self._lock:
            if self._draining:
                raise ServerBusy(
                    "the server is shutting down and takes no new generations",
                    retry_after_s=self._retry_after_s(),
                )
            if len(self._admitted) >= self._max_concurrent + self._max_queue:
                room = f" and {self._max_queue} queue place(s) are" if self._max_queue else " is"
                raise ServerBusy(
                    f"all {self._max_concurrent} generation worker(s){room} taken",
                    retry_after_s=self._retry_after_s(),
                )
            job = self._registry.create(request)
            self._admitted[job.id] = _Admitted()
        self._queue.put((job.id, request))
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job (idempotent); its slot is free on return."""
        with self._lock:
            job = self._registry.cancel(job_id)
            admitted = self._admitted.pop(job_id, None)
            if admitted is not None:
                admitted.cancelled.set()
        return job

    # -- the workers -------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, tuple)
                if not self._run_guarded(*item):
                    return
        finally:
            self._replace_if_dead()

    def _run_guarded(self, job_id: str, request: GenerationRequest) -> bool:
        """Run one job; False when this thread must end (SystemExit and the like)."""
        try:
            self._run(job_id, request)
        except BaseException as exc:
            # Whatever broke, the job must still end: nothing accepted stays open.
            log.error("job %s: unexpected failure in the worker", job_id, exc_info=exc)
            error = JobError("Generation failed: internal error", ErrorCode.UNKNOWN_ERROR)
            self._end_quietly(job_id, lambda jid: self._registry.fail(jid, error))
            return isinstance(exc, Exception)
        finally:
            with self._lock:
                self._admitted.pop(job_id, None)
                self._changed.notify_all()
            trim_heap()
        return True

    def _replace_if_dead(self) -> None:
        """Called as a worker thread ends: unless stopping, start one in its place."""
        if self._stopping.is_set():
            return
        log.error("%s ended; starting a replacement", threading.current_thread().name)
        worker = threading.Thread(target=self._work, name="generation-worker-r", daemon=True)
        with self._lock:
            self._workers = [w for w in self._workers if w is not threading.current_thread()]
            self._workers.append(worker)
        worker.start()

    def _run(self, job_id: str, request: GenerationRequest) -> None:
        with self._lock:
            admitted = self._admitted.get(job_id)
            if admitted is None or admitted.cancelled.is_set():
                return  # cancelled while it waited
            if self._draining:
                self._admitted.pop(job_id)  # stays pending: a persistent store runs it later
                return
            try:
                self._registry.start(job_id)
            except (AlreadyTerminal, NotFound):
                return
            admitted.started_at = time.monotonic()
            self._running += 1
        try:
            self._generate(job_id, request, admitted)
        finally:
            with self._lock:
                self._running -= 1
                self._changed.notify_all()

    def _generate(self, job_id: str, request: GenerationRequest, admitted: _Admitted) -> None:
        started = time.monotonic()
        work = _work_units(request)

        def report(progress: Progress) -> None:
            eta = self._eta_ms(progress.percentage, (time.monotonic() - started) * 1000, work)
            try:
                self._registry.report_progress(job_id, replace(progress, eta_ms=eta))
            except (AlreadyTerminal, NotFound):
                admitted.cancelled.set()  # the job ended elsewhere: stop drawing it

        def should_stop() -> bool:
            if admitted.cancelled.is_set():
                return True
            if self._timeout_ms and time.monotonic() - started > self._timeout_ms / 1000:
                raise GenerationTimedOut(
                    f"timed out after {self._timeout_ms} ms (IMAGE_GENERATION_TIMEOUT_MS)"
                )
            return False

        try:
            images, timings = run_batch(
                self._backend,
                request,
                report=report,
                should_cancel=should_stop,
                encode=self._encode,
                recipe=self._recipe,
                encode_preview=encode_preview,
            )
        except GenerationCancelled:
            log.debug("job %s stopped after %.2f s (cancelled)", job_id, time.monotonic() - started)
            return
        except BatchFailed as failure:
            error = failure.to_job_error()
            # The transition line says what the client sees; the cause's trace is for the log.
            log.warning("job %s failed: %r", job_id, failure.cause, exc_info=failure.cause)
            self._end_quietly(job_id, lambda jid: self._registry.fail(jid, error))
            return
        elapsed_ms = round((time.monotonic() - started) * 1000)
        self._learn_pace(elapsed_ms, work)
        result = Result(images, elapsed_ms, timings=timings)
        self._end_quietly(job_id, lambda jid: self._registry.complete(jid, result))

    # -- estimates -----------------------------------------------------------------------

    def _eta_ms(self, percentage: float, elapsed_ms: float, work: int) -> int | None:
        """Time left: from this job's own pace, and from the pace of earlier jobs per unit of
        work (pixels x steps x images) while this one has too little progress to go by."""
        left = (100 - percentage) / 100
        own = elapsed_ms * left / (percentage / 100) if percentage >= 1 else None
        past = self._ms_per_unit * work * left if self._ms_per_unit is not None else None
        if own is None:
            estimate = past
        elif past is None:
            estimate = own
        else:
            trust = min(1.0, percentage / 25)  # this job's own pace, fully from 25 %
            estimate = trust * own + (1 - trust) * past
        return None if estimate is None else max(0, round(estimate))

    def _learn_pace(self, elapsed_ms: int, work: int) -> None:
        rate = elapsed_ms / work
        with self._lock:
            old = self._ms_per_unit
            self._ms_per_unit = rate if old is None else 0.7 * old + 0.3 * rate

    def _recipe(self, spec: ImageSpec) -> dict[str, str]:
        return image_recipe(spec, self._model_name)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _end_quietly(job_id: str, end: Callable[[str], Job]) -> None:
        """Record a final state unless the job already has one (a cancel won the race)."""
        with contextlib.suppress(AlreadyTerminal, NotFound):
            end(job_id)

    def _not_ready_message(self) -> str:
        if self._load_error is not None:
            return f"the model failed to load: {self._load_error}"
        return "the model is still loading"

    def _retry_after_s(self) -> int:
        """Seconds until the soonest running job should finish, from its own pace (1..60)."""
        now = time.monotonic()
        estimates: list[float] = []
        for job_id, admitted in self._admitted.items():
            if admitted.started_at is None:
                continue
            try:
                progress = self._registry.get(job_id).progress
            except NotFound:
                continue
            if progress is not None and progress.percentage > 0:
                elapsed = now - admitted.started_at
                estimates.append(elapsed * (100 - progress.percentage) / progress.percentage)
        soonest = min(estimates, default=1.0)
        return min(60, max(1, math.ceil(soonest)))
