"""`diffusiond worker`: a SAQ worker that loads the model once and runs one job at a time.

Each job is a `JobRun` (diffusiond.engine.run, the same run core as the single-process
engine), drawn on a thread while the worker's event loop writes its latest progress into
the SAQ record with `job.update()`: at every report (the latest only: a slow Redis never
queues stale steps) and at least every third of the heartbeat while a long step or a decode
runs, so a live worker is never swept. Each of those writes also reads the job's cancel mark;
the per-step callback then stops the pipeline cooperatively at its next step. SAQ's own
abort (which cancels the job's task) is honoured the same way. How this differs from the
in-process engine, and why, is said once, in diffusiond.engine.run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from redis.exceptions import RedisError
from saq import Worker
from saq.job import Job as SaqJob
from saq.queue.redis import RedisQueue
from saq.types import Context, PartialTimersDict

from diffusiond.backends.base import Backend
from diffusiond.backends.factory import make_backend
from diffusiond.broker.mapping import (
    CANCELLED_OUTCOME,
    Json,
    complete_outcome,
    error_outcome,
    progress_to_json,
    request_from_json,
)
from diffusiond.broker.queue import JOB_FUNCTION, cancel_key, open_queue
from diffusiond.engine.run import (
    Completed,
    Failed,
    JobRun,
    Outcome,
    Pace,
    load_backend,
    model_name,
)
from diffusiond.errors import SettingsError
from diffusiond.jobs.models import Progress
from diffusiond.memory import trim_heap
from diffusiond.redaction import redact_text, redact_url
from diffusiond.settings import Settings

log = logging.getLogger(__name__)


def saq_outcome(outcome: Outcome) -> Json:
    """The job function's return value for a run's outcome (see broker/mapping.py)."""
    if isinstance(outcome, Completed):
        return complete_outcome(outcome.result)
    if isinstance(outcome, Failed):
        return error_outcome(outcome.error)
    return CANCELLED_OUTCOME


class _Publisher:
    """Carries one run's progress from its generation thread to the SAQ record."""

    def __init__(self, job: SaqJob, queue: RedisQueue) -> None:
        self.job = job
        self._queue = queue
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._version = 0

    def wake(self, _progress: Progress) -> None:
        """On the generation thread: a new report is there to publish."""
        self._loop.call_soon_threadsafe(self._wake.set)

    async def follow(self, run: JobRun, generation: asyncio.Future[Outcome]) -> None:
        """Publish progress and heartbeats, and look for a cancel, until the run ends."""
        beat_s = max(0.5, self.job.heartbeat / 3) if self.job.heartbeat else 5.0
        while not generation.done():
            woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
            pending: set[asyncio.Future[Any]] = {generation, woken}
            await asyncio.wait(pending, timeout=beat_s, return_when="FIRST_COMPLETED")
            woken.cancel()
            self._wake.clear()
            if not generation.done():
                await self.publish(run)

    async def publish(self, run: JobRun) -> None:
        progress = run.progress_now()
        self._version += 1
        meta: dict[str, Any] = {"v": self._version}
        if progress is not None:
            meta["progress"] = progress_to_json(progress)
        if await self._queue.redis.exists(cancel_key(self.job.key)):
            run.cancel()
        fraction = progress.percentage / 100 if progress is not None else 0.0
        await self.job.update(meta=meta, progress=fraction)


class WorkerRuntime:
    """The warm state of one worker process: its loaded backend, and the job function."""

    def __init__(self, settings: Settings, backend: Backend, queue: RedisQueue) -> None:
        self._settings = settings
        self._queue = queue
        self._backend = backend
        self._model = "?"
        self._pace = Pace()
        # Published with the worker's info (SAQ's worker_info), read by /health on API nodes.
        self.metadata: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}

    async def startup(self, _ctx: Context) -> None:
        info = await asyncio.to_thread(load_backend, self._backend)
        self._model = model_name(info)
        self.metadata.update(
            backend=info.name, model=info.model, device=info.device, dtype=info.dtype
        )
        print("diffusiond: worker ready", flush=True)

    async def generate(self, ctx: Context, *, request: Json) -> Json:
        """SAQ's job function: one batch, returned as its outcome (never raised)."""
        job = ctx["job"]
        publisher = _Publisher(job, self._queue)
        run = JobRun(
            job.key,
            request_from_json(request),
            pace=self._pace,
            timeout_ms=self._settings.generation_timeout_ms,
            on_progress=publisher.wake,
        )
        run.mark_started()
        await publisher.publish(run)  # in_progress at once, and a first heartbeat
        if run.cancelled:
            return CANCELLED_OUTCOME
        generation = asyncio.ensure_future(
            asyncio.to_thread(run.run, self._backend, model=self._model)
        )
        try:
            await publisher.follow(run, generation)
        except asyncio.CancelledError:  # SAQ's abort, or the worker stopping
            run.cancel()
            await asyncio.wait({generation})  # the thread stops at its next step
            raise
        finally:
            trim_heap()
        return saq_outcome(generation.result())


async def _work(settings: Settings, backend: Backend) -> None:
    assert settings.broker is not None
    queue = open_queue(settings.broker)
    try:
        await queue.connect()
        await queue.count("queued")
    except (RedisError, OSError) as exc:
        raise SettingsError(
            f"--broker {redact_url(settings.broker)}: cannot reach Redis: {redact_text(str(exc))}"
        ) from None
    runtime = WorkerRuntime(settings, backend, queue)
    timers: PartialTimersDict = {
        "schedule": 1,
        "sweep": settings.broker_sweep_s,
        "abort": 1,
        "worker_info": max(1, min(10, settings.broker_heartbeat_s - 1)),
    }
    worker: Worker[Context] = Worker(
        queue,
        functions=[(JOB_FUNCTION, runtime.generate)],
        concurrency=1,
        startup=runtime.startup,
        timers=timers,
        dequeue_timeout=1,  # an idle worker notices a stop signal within a second
        metadata=runtime.metadata,
        shutdown_grace_period_s=settings.grace_seconds,
    )
    try:
        await worker.start()
    finally:
        await queue.disconnect()


def run_worker(settings: Settings) -> int:
    """Serve jobs from the broker until SIGTERM/SIGINT (a running job gets the grace time)."""
    if settings.broker is None:
        raise SettingsError(
            "diffusiond worker needs the queue to take jobs from: --broker redis://HOST:PORT/DB "
            "(or DIFFUSIOND_BROKER)"
        )
    # The model loads in this process (the worker's startup hook), never in a parent that
    # forks: CUDA does not survive a fork.
    asyncio.run(_work(settings, make_backend(settings)))
    return 0
