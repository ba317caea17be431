"""An API node's listing reads what it returns, not every job in Redis (issue 14, item 6),
over a real redis-server: jobs submitted as an API node does, some finished with images."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from saq.job import Status
from saq.queue.redis import RedisQueue

from diffusiond.api.schemas import summary_body
from diffusiond.broker.bridge import LoopThread
from diffusiond.broker.mapping import complete_outcome, to_job
from diffusiond.broker.node import BrokerEngine, BrokerRegistry
from diffusiond.broker.queue import CREATED_INDEX, JobOptions, cancel_key, open_queue
from diffusiond.jobs.models import GeneratedImage, GenerationRequest, JobStatus, Result
from tests.support.broker import start_redis

JOBS = 30
FINISHED = 12  # the oldest jobs, each with a 200 kB "image"


class Node:
    """A registry and an engine as `serve --broker` builds them, on a real bridge loop."""

    def __init__(self, url: str) -> None:
        self.bridge = LoopThread(url)
        self.queue: RedisQueue = open_queue(url)
        self.bridge.call(self.queue.connect())
        self.registry = BrokerRegistry(self.bridge, self.queue)
        self.engine = BrokerEngine(
            self.bridge,
            self.queue,
            self.registry,
            options=JobOptions.from_settings(600_000, 10),
            max_queue=JOBS + 1,
        )
        self.deserialized = 0
        deserialize = self.queue.deserialize

        def counted(payload: Any, status: Any = None) -> Any:
            self.deserialized += 1
            return deserialize(payload, status)

        self.queue.deserialize = counted  # type: ignore[method-assign]

    def reference(self) -> list[dict[str, object]]:
        """Every job, read record by record and sorted: what a listing must answer."""

        async def everything() -> list[dict[str, object]]:
            jobs = []
            async for saq_job in self.queue.iter_jobs():
                mark = await self.queue.redis.get(cancel_key(saq_job.key))
                jobs.append(to_job(saq_job, int(mark) if mark is not None else None))
            jobs.sort(key=lambda job: (job.created_at, job.id), reverse=True)
            return [summary_body(job) for job in jobs]

        return self.bridge.call(everything())

    def finish_oldest(self, count: int) -> None:
        async def finish() -> None:
            png = b"\x89PNG" + bytes(200_000)
            for _ in range(count):
                saq_job = await self.queue.dequeue(timeout=1)
                assert saq_job is not None
                await saq_job.update(status=Status.ACTIVE)
                outcome = complete_outcome(Result((GeneratedImage(png, 1, 64, 64),), 5))
                await saq_job.finish(Status.COMPLETE, result=outcome)

        self.bridge.call(finish())

    def close(self) -> None:
        self.bridge.call(self.queue.disconnect())
        self.bridge.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    redis_server = start_redis(tmp_path)
    built = Node(redis_server.url)
    try:
        for index in range(JOBS):
            built.engine.submit(GenerationRequest(prompt=f"job {index}", seed=index))
        built.finish_oldest(FINISHED)
        built.engine.cancel(built.registry.list(limit=1)[0].id)
        yield built
    finally:
        built.close()
        redis_server.stop()


def _listed(node: Node, statuses: set[JobStatus] | None, limit: int | None) -> list[Any]:
    node.deserialized = 0
    return [summary_body(job) for job in node.registry.list(statuses, limit)]


def test_a_limit_1_listing_reads_about_one_job(node: Node) -> None:
    expected = node.reference()
    assert len(expected) == JOBS
    assert _listed(node, None, 1) == expected[:1]
    assert node.deserialized <= 2, f"{node.deserialized} records read to list one"
    assert _listed(node, None, 5) == expected[:5]
    assert node.deserialized <= 6


def test_listings_answer_as_reading_every_job_would(node: Node) -> None:
    expected = node.reference()
    assert _listed(node, None, None) == expected
    for statuses in ({JobStatus.COMPLETE}, {JobStatus.CANCELLED}, {JobStatus.PENDING}):
        wanted = [body for body in expected if body["status"] in {s.value for s in statuses}]
        assert wanted, statuses
        assert _listed(node, statuses, None) == wanted
        assert _listed(node, statuses, 2) == wanted[:2]
    assert _listed(node, {JobStatus.ERROR}, 3) == []


def test_a_filtered_listing_stops_once_it_has_enough(node: Node) -> None:
    # The complete jobs are the oldest 12 of 30: pages of 8, 16 reach the first ones.
    _listed(node, {JobStatus.COMPLETE}, 1)
    assert node.deserialized <= JOBS - FINISHED + 8


def test_expired_jobs_leave_the_index(node: Node) -> None:
    newest = node.registry.list(limit=1)[0].id
    node.bridge.call(_run(node.queue.redis.delete(node.queue.job_id(newest))))
    listed = [job.id for job in node.registry.list()]
    assert newest not in listed
    assert len(listed) == JOBS - 1
    assert node.bridge.call(_run(node.queue.redis.zcard(CREATED_INDEX))) == JOBS - 1


async def _run(call: Awaitable[Any]) -> Any:
    return await call
