"""A worker's job function when Redis fails under it (issue 14, item 6), over a real
redis-server: the generation thread is stopped and waited for before the function returns."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, cast

from PIL.Image import Image
from redis.exceptions import ConnectionError as RedisConnectionError
from saq.job import Job as SaqJob
from saq.job import Status
from saq.types import Context

from diffusiond.backends.base import CancelCheck, ImageSpec, PreviewCallback, StageCallback
from diffusiond.broker.mapping import request_to_json
from diffusiond.broker.queue import JOB_FUNCTION
from diffusiond.broker.worker import WorkerQueue, WorkerRuntime
from diffusiond.jobs.models import GenerationRequest
from diffusiond.settings import Settings
from tests.support.broker import start_redis
from tests.support.fakes import FakeBackend

REQUEST = GenerationRequest(prompt="x", width=64, height=64, steps=60)


class WatchedBackend(FakeBackend):
    """A FakeBackend that says whether a generation is drawing right now."""

    def __init__(self) -> None:
        super().__init__(step_seconds=0.05)
        self.drawing = threading.Event()
        self.started = threading.Event()

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        self.drawing.set()
        self.started.set()
        try:
            return super().generate(spec, on_stage, should_cancel, on_preview)
        finally:
            self.drawing.clear()


async def _run_with_failing_publish(url: str, backend: WatchedBackend) -> tuple[Any, bool]:
    """The job function's result (or the exception it raised) and whether a generation was
    still drawing when it returned; Redis fails at the second progress write."""
    queue = WorkerQueue.from_url(url, name="t")
    await queue.connect()
    try:
        await queue.enqueue(
            SaqJob(function=JOB_FUNCTION, kwargs={"request": request_to_json(REQUEST)}, key="j")
        )
        job = await queue.dequeue(timeout=5)
        assert job is not None
        await job.update(status=Status.ACTIVE)
        writes = 0
        update = queue.update

        async def failing_update(saq_job: SaqJob, **fields: Any) -> None:
            nonlocal writes
            writes += 1
            if writes > 1 and backend.started.is_set():
                raise RedisConnectionError("Error 111 connecting to the broker")
            await update(saq_job, **fields)

        queue.update = failing_update  # type: ignore[method-assign, assignment]
        runtime = WorkerRuntime(Settings(), backend, queue)
        try:
            context = cast(Context, {"job": job})
            result: Any = await runtime.generate(context, request=request_to_json(REQUEST))
        except RedisConnectionError as exc:
            result = exc
        return result, backend.drawing.is_set()
    finally:
        await queue.disconnect()


def test_a_failed_progress_write_stops_the_generation_before_the_next_job(
    tmp_path: Path,
) -> None:
    redis_server = start_redis(tmp_path)
    backend = WatchedBackend()
    try:
        result, still_drawing = asyncio.run(_run_with_failing_publish(redis_server.url, backend))
    finally:
        redis_server.stop()
    assert not still_drawing, "the job function returned while its generation still ran"
    assert result == {
        "outcome": "error",
        "code": "WORKER_LOST",
        "message": "The worker lost its connection to the broker while this generation ran; "
        "submit it again.",
    }
    assert backend.stopped_at is not None
    assert backend.stopped_at < REQUEST.steps
