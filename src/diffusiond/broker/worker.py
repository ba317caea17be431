"""`diffusiond worker`: a SAQ worker that loads the model once and runs one job at a time.

Each job is a `JobRun` (diffusiond.engine.run, the same run core as the single-process
engine), drawn on a thread while the worker's event loop writes its latest progress into
the SAQ record with `job.update()`: at every report (the latest only: a slow Redis never
queues stale steps) and at least every third of the heartbeat while a long step or a decode
runs, so a live worker is never swept. Each of those writes also reads the job's cancel mark;
the per-step callback then stops the pipeline cooperatively at its next step. SAQ's own
abort (which cancels the job's task) is honoured the same way. How this differs from the
in-process engine, and why, is said once, in diffusiond.engine.run.

The generation thread is always accounted for: whatever ends the job function (a finished
run, an abort, a stop signal, or a Redis error while publishing), the thread is told to stop
and waited for before the function returns, so a worker never draws two jobs at once. And a
job never goes back to pending: one stopped past the shutdown grace ends as an error
(WORKER_LOST, "submit it again") instead of SAQ's re-queueing, because the contract says a
job ends complete, error or cancelled, and `cancelled` is kept for what a user asked for.
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
from saq.job import Status
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
from diffusiond.jobs.models import ErrorCode, JobError, Progress
from diffusiond.memory import trim_heap
from diffusiond.redaction import redact_text, redact_url
from diffusiond.settings import Settings

log = logging.getLogger(__name__)

BROKER_LOST = JobError(
    "The worker lost its connection to the broker while this generation ran; submit it again.",
    ErrorCode.WORKER_LOST,
)
STOPPED = JobError(
    "The worker was stopped before this generation finished (its shutdown grace ran out); "
    "submit it again.",
    ErrorCode.WORKER_LOST,
)
# After the grace, SAQ cancels the job function and waits this long for it: the generation
# stops at its next diffusion step, which on a CPU may take seconds (SAQ's default is 1 s).
CANCEL_DEADLINE_S = 30.0


class WorkerQueue(RedisQueue):
    """The queue as a worker uses it: SAQ's retry (what it does to a job whose function it
    cancelled at shutdown) ends the job instead, as an error; a job runs once."""

    async def retry(self, job: SaqJob, error: str | None) -> None:
        log.warning("job %s ended WORKER_LOST: the worker stopped (%s)", job.key, error)
        await self.finish(job, Status.COMPLETE, result=error_outcome(STOPPED))


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
            backend=info.name,
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            architecture=info.architecture,
            models=list(info.models),
            components=dict(info.components),
            offload=info.offload,
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
            await _stopped(run, generation)
            raise
        except (RedisError, OSError) as exc:  # Redis failed under a progress write
            log.warning("job %s: the broker failed (%s): stopping the generation", job.key, exc)
            outcome = await _stopped(run, generation)
            return (
                saq_outcome(outcome)
                if isinstance(outcome, Completed)
                else error_outcome(BROKER_LOST)
            )
        finally:
            trim_heap()
            # the models loaded now, published with the next worker_info (GET /v1/models)
            self.metadata["models"] = list(self._backend.info().models)
        return saq_outcome(generation.result())


async def _stopped(run: JobRun, generation: asyncio.Future[Outcome]) -> Outcome:
    """Stop the generation thread and wait for it (it stops at its next step)."""
    run.cancel()
    await asyncio.wait({generation})
    return generation.result()


async def _work(settings: Settings, backend: Backend) -> None:
    assert settings.broker is not None
    queue = open_queue(settings.broker, WorkerQueue)
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
        cancellation_hard_deadline_s=CANCEL_DEADLINE_S,
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
