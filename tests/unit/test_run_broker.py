"""An API node's Retry-After goes by the etaMs its workers published (engine/run.py says
why), over a real redis-server: a job made active as a worker would, its progress written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from saq.job import Job as SaqJob

from diffusiond.broker.mapping import progress_to_json, request_to_json
from diffusiond.broker.node import BrokerEngine
from diffusiond.broker.queue import JOB_FUNCTION, JobOptions, open_queue
from diffusiond.errors import ServerBusy
from diffusiond.jobs.models import GenerationRequest, Progress, Stage
from tests.support.broker import start_redis

REQUEST = GenerationRequest(prompt="x")


async def _refusal_while_a_job_runs(url: str, eta_ms: int | None) -> ServerBusy:
    queue = open_queue(url)
    await queue.connect()
    try:
        await queue.enqueue(
            SaqJob(function=JOB_FUNCTION, kwargs={"request": request_to_json(REQUEST)}, key="j1")
        )
        running = await queue.dequeue(timeout=5)  # what a worker does: now it is active
        assert running is not None
        progress = Progress(Stage.DIFFUSION, 3, 20, 14.0, 1, 1, eta_ms=eta_ms)
        await running.update(meta={"v": 1, "progress": progress_to_json(progress)})
        engine = BrokerEngine(
            cast(Any, None),  # the bridge: not used by the coroutines called here
            queue,
            cast(Any, None),
            options=JobOptions.from_settings(60_000, 10),
            max_queue=0,
        )
        with pytest.raises(ServerBusy) as caught:  # no worker and no queue place: refused
            await engine._submit(REQUEST)
        return caught.value
    finally:
        await queue.disconnect()


def test_retry_after_is_the_running_jobs_time_left(tmp_path: Path) -> None:
    redis_server = start_redis(tmp_path)
    try:
        refused = asyncio.run(_refusal_while_a_job_runs(redis_server.url, 42_000))
    finally:
        redis_server.stop()
    assert refused.details["retryAfterSeconds"] in (41, 42)  # 42 s, less the time since


def test_retry_after_without_an_estimate_is_one_second(tmp_path: Path) -> None:
    redis_server = start_redis(tmp_path)
    try:
        refused = asyncio.run(_refusal_while_a_job_runs(redis_server.url, None))
    finally:
        redis_server.stop()
    assert refused.details["retryAfterSeconds"] == 1
