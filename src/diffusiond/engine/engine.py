"""Admission, worker threads, cancel tokens, and the record of how each job ends."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from diffusiond.backends.base import Backend, BackendInfo
from diffusiond.engine.admission import Admission
from diffusiond.engine.batch import Encoder
from diffusiond.engine.run import (
    Cancelled,
    Completed,
    Failed,
    JobRun,
    Pace,
    load_backend,
    model_name,
    retry_after_s,
)
from diffusiond.errors import AlreadyTerminal, NotFound, ServerBusy, ServerNotReady
from diffusiond.imaging import encode_png
from diffusiond.jobs.models import ErrorCode, GenerationRequest, Job, JobError, JobStatus, Progress
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.memory import trim_heap

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class EngineStats:
    running: int
    admitted: int
    max_concurrent: int


class Engine(Admission):
    """Runs generations on `max_concurrent` worker threads outside the event loop.

    A job is admitted only while fewer than `max_concurrent + max_queue` admitted jobs are
    unfinished; otherwise `submit` raises `ServerBusy`. Admitted jobs run in arrival order.
    Cancelling frees the job's slot at once; the worker stops the generation at its next
    diffusion step. Each admitted job is a `JobRun` (engine/run.py), which runs it; the
    engine moves runs in and out of its workers and records their outcomes.
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
        self._timeout_ms = timeout_ms
        self._encode = encode
        super().__init__(max_queue)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a job stops
        self._admitted: dict[str, JobRun] = {}  # in arrival order
        self._running = 0
        self._queue: queue.SimpleQueue[str | object] = queue.SimpleQueue()
        self._ready = threading.Event()
        # Workers take no job before this opens (model loaded, or stopping), so that jobs
        # restored before the load are all queued ahead of the first new one.
        self._open = threading.Event()
        self._stopping = threading.Event()
        self._load_error: str | None = None
        self._pace = Pace()
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
        try:
            info = load_backend(self._backend)
        except BaseException as exc:
            self._load_error = str(exc) or type(exc).__name__
            raise
        self._model_name = model_name(info)
        self._ready.set()
        self._open.set()

    def resume(self, pending: list[Job]) -> None:
        """Queue jobs accepted before a restart, in their old order, ahead of every new one.

        Call it before `load_model()`: no job is taken before the model is loaded, and none
        is admitted before it either, so nothing can come between the restored jobs.
        """
        with self._lock:
            if self._ready.is_set():
                raise RuntimeError("resume() must come before load_model()")
            for job in pending:
                self._admit(job.id, job.request)
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
                for job_id, run in list(self._admitted.items()):
                    if run.started_at is not None:
                        run.cancel()
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
            for job_id, run in self._admitted.items():
                run.cancel()
                if run.started_at is not None:
                    self._end_quietly(job_id, self._registry.cancel)
            if not keep_pending:
                for job in self._registry.list({JobStatus.PENDING}):
                    self._end_quietly(job.id, self._registry.cancel)
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(_STOP)
        self._open.set()
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
            for waiting_id, run in self._admitted.items():
                if run.started_at is None:
                    position += 1
                    if waiting_id == job_id:
                        return position
        return None

    def submit(self, request: GenerationRequest) -> Job:
        if not self._ready.is_set():
            raise ServerNotReady(self._not_ready_message())
        with self._lock:
            self._refuse_if_draining(self._retry_after_s)
            if len(self._admitted) >= self._max_concurrent + self._max_queue:
                room = f" and {self._max_queue} queue place(s) are" if self._max_queue else " is"
                raise ServerBusy(
                    f"all {self._max_concurrent} generation worker(s){room} taken",
                    retry_after_s=self._retry_after_s(),
                )
            job = self._registry.create(request)
            self._admit(job.id, request)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job (idempotent); its slot is free on return."""
        with self._lock:
            job = self._registry.cancel(job_id)
            run = self._admitted.pop(job_id, None)
            if run is not None:
                run.cancel()
        return job

    # -- the workers -------------------------------------------------------------------

    def _admit(self, job_id: str, request: GenerationRequest) -> None:
        """Make the job's run and queue it (under the lock)."""

        def write(progress: Progress) -> None:
            try:
                self._registry.report_progress(job_id, progress)
            except (AlreadyTerminal, NotFound):
                run.cancel()  # the job ended elsewhere: stop drawing it

        run = JobRun(
            job_id, request, pace=self._pace, timeout_ms=self._timeout_ms, on_progress=write
        )
        self._admitted[job_id] = run
        self._queue.put(job_id)

    def _work(self) -> None:
        try:
            self._open.wait()
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, str)
                if not self._run_guarded(item):
                    return
        finally:
            self._replace_if_dead()

    def _run_guarded(self, job_id: str) -> bool:
        """Run one job; False when this thread must end (SystemExit and the like)."""
        try:
            self._run(job_id)
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

    def _run(self, job_id: str) -> None:
        with self._lock:
            run = self._admitted.get(job_id)
            if run is None or run.cancelled:
                return  # cancelled while it waited
            if self._draining:
                self._admitted.pop(job_id)  # stays pending: a persistent store runs it later
                return
            try:
                self._registry.start(job_id)
            except (AlreadyTerminal, NotFound):
                return
            run.mark_started()
            self._running += 1
        try:
            self._record(job_id, run)
        finally:
            with self._lock:
                self._running -= 1
                self._changed.notify_all()

    def _record(self, job_id: str, run: JobRun) -> None:
        """Run the job and write its outcome into the registry."""
        outcome = run.run(self._backend, model=self._model_name, encode=self._encode)
        with self._lock:
            # The slot is free before the job shows as ended: a client that submits the
            # moment it sees its job end must not be refused as busy.
            self._admitted.pop(job_id, None)
        if isinstance(outcome, Completed):
            result = outcome.result
            self._end_quietly(job_id, lambda jid: self._registry.complete(jid, result))
        elif isinstance(outcome, Failed):
            error = outcome.error
            self._end_quietly(job_id, lambda jid: self._registry.fail(jid, error))
        else:
            assert isinstance(outcome, Cancelled)  # recorded by whoever cancelled it

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
        """Until the soonest running job should end, from each run's own estimate (1..60)."""
        return retry_after_s(
            run.eta_ms_now() for run in self._admitted.values() if run.started_at is not None
        )
