"""`diffusiond worker`: a SAQ worker that loads the model once and runs one job at a time.

The generation runs in a thread (the batch loop of diffusiond.engine.batch, as in the
single-process engine) while the worker's event loop writes its progress into the SAQ
record with `job.update()`: at every diffusion step (the latest progress only: a slow Redis
never queues stale steps) and at least every third of the heartbeat while a long step or a
decode runs, so a live worker is never swept. Each of those writes also reads the job's
cancel mark; the per-step callback then stops the pipeline cooperatively at its next step.
SAQ's own abort (which cancels the job's task) is honoured the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time
from pathlib import PurePath
from typing import Any

from redis.exceptions import RedisError
from saq import Worker
from saq.job import Job as SaqJob
from saq.queue.redis import RedisQueue
from saq.types import Context, PartialTimersDict

from diffusiond.backends.base import Backend, GenerationCancelled, ImageSpec
from diffusiond.broker.mapping import (
    CANCELLED_OUTCOME,
    Json,
    complete_outcome,
    error_outcome,
    progress_to_json,
    request_from_json,
)
from diffusiond.broker.queue import JOB_FUNCTION, cancel_key, open_queue
from diffusiond.engine.batch import BatchFailed, image_recipe, run_batch
from diffusiond.engine.engine import GenerationTimedOut
from diffusiond.errors import SettingsError
from diffusiond.imaging import encode_png, encode_preview
from diffusiond.jobs.models import GeneratedImage, GenerationRequest, Progress, Result, StageTimings
from diffusiond.memory import trim_heap
from diffusiond.settings import Settings

log = logging.getLogger(__name__)

Batch = tuple[tuple[GeneratedImage, ...], StageTimings]


class _Run:
    """One job on this worker: the bridge between its generation thread and the loop."""

    def __init__(self, job: SaqJob, queue: RedisQueue, timeout_ms: int) -> None:
        self.job = job
        self._queue = queue
        self.cancelled = threading.Event()
        self._timeout_ms = timeout_ms
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._latest: Progress | None = None
        self._version = 0
        self.started = time.monotonic()

    # -- on the generation thread ----------------------------------------------------------

    def report(self, progress: Progress) -> None:
        with self._lock:
            previous = self._latest
            if (
                progress.preview is None
                and previous is not None
                and previous.preview is not None
                and previous.current_image == progress.current_image
            ):
                progress = dataclasses.replace(progress, preview=previous.preview)
            self._latest = progress
        self._loop.call_soon_threadsafe(self._wake.set)

    def should_stop(self) -> bool:
        if self.cancelled.is_set():
            return True
        if self._timeout_ms and time.monotonic() - self.started > self._timeout_ms / 1000:
            raise GenerationTimedOut(
                f"timed out after {self._timeout_ms} ms (IMAGE_GENERATION_TIMEOUT_MS)"
            )
        return False

    # -- on the worker's event loop -----------------------------------------------------------

    async def follow(self, generation: asyncio.Future[Batch]) -> None:
        """Publish progress and heartbeats, and look for a cancel, until the batch ends."""
        beat_s = max(0.5, self.job.heartbeat / 3) if self.job.heartbeat else 5.0
        while not generation.done():
            woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
            pending: set[asyncio.Future[Any]] = {generation, woken}
            await asyncio.wait(pending, timeout=beat_s, return_when="FIRST_COMPLETED")
            woken.cancel()
            self._wake.clear()
            if not generation.done():
                await self.publish()

    async def publish(self) -> None:
        with self._lock:
            progress = self._latest
        self._version += 1
        meta: dict[str, Any] = {"v": self._version}
        fraction = 0.0
        if progress is not None:
            elapsed_ms = (time.monotonic() - self.started) * 1000
            percentage = progress.percentage
            eta = round(elapsed_ms * (100 - percentage) / percentage) if percentage >= 1 else None
            meta["progress"] = progress_to_json(dataclasses.replace(progress, eta_ms=eta))
            fraction = percentage / 100
        if await self._queue.redis.exists(cancel_key(self.job.key)):
            self.cancelled.set()
        await self.job.update(meta=meta, progress=fraction)


class WorkerRuntime:
    """The warm state of one worker process: its loaded backend, and the job function."""

    def __init__(self, settings: Settings, backend: Backend, queue: RedisQueue) -> None:
        self._settings = settings
        self._queue = queue
        self._backend = backend
        self._model = "?"
        # Published with the worker's info (SAQ's worker_info), read by /health on API nodes.
        self.metadata: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}

    async def startup(self, _ctx: Context) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self._backend.load)
        info = self._backend.info()
        self._model = PurePath(info.model).name
        self.metadata.update(
            backend=info.name, model=info.model, device=info.device, dtype=info.dtype
        )
        log.info("model ready in %.1f s: %s", time.monotonic() - started, info)
        print("diffusiond: worker ready", flush=True)

    async def generate(self, ctx: Context, *, request: Json) -> Json:
        """SAQ's job function: one batch, returned as its outcome (never raised)."""
        job = ctx["job"]
        run = _Run(job, self._queue, self._settings.generation_timeout_ms)
        await run.publish()  # in_progress at once, and a first heartbeat
        if run.cancelled.is_set():
            return CANCELLED_OUTCOME
        generation = asyncio.ensure_future(
            asyncio.to_thread(self._batch, request_from_json(request), run)
        )
        try:
            await run.follow(generation)
        except asyncio.CancelledError:  # SAQ's abort, or the worker stopping
            run.cancelled.set()
            await asyncio.wait({generation})  # the thread stops at its next step
            raise
        finally:
            trim_heap()
        try:
            images, timings = generation.result()
        except GenerationCancelled:
            log.info("job %s cancelled", job.key)
            return CANCELLED_OUTCOME
        except BatchFailed as failure:
            log.warning("job %s failed: %r", job.key, failure.cause, exc_info=failure.cause)
            return error_outcome(failure.to_job_error())
        elapsed_ms = round((time.monotonic() - run.started) * 1000)
        return complete_outcome(Result(images, elapsed_ms, timings=timings))

    def _batch(self, request: GenerationRequest, run: _Run) -> Batch:
        return run_batch(
            self._backend,
            request,
            report=run.report,
            should_cancel=run.should_stop,
            encode=encode_png,
            recipe=self._recipe,
            encode_preview=encode_preview,
        )

    def _recipe(self, spec: ImageSpec) -> dict[str, str]:
        return image_recipe(spec, self._model)


async def _work(settings: Settings, backend: Backend) -> None:
    assert settings.broker is not None
    queue = open_queue(settings.broker)
    try:
        await queue.connect()
        await queue.count("queued")
    except (RedisError, OSError) as exc:
        raise SettingsError(f"--broker {settings.broker}: cannot reach Redis: {exc}") from None
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
    from diffusiond.server import make_backend

    # The model loads in this process (the worker's startup hook), never in a parent that
    # forks: CUDA does not survive a fork.
    asyncio.run(_work(settings, make_backend(settings)))
    return 0
