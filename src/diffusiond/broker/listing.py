"""The job listing of an API node: newest first, at a cost in what it returns.

SAQ keeps no index a listing could use, and reading every record (each holding its
result's base64 PNGs) to return one is what `GET /v1/images/generations?limit=1` must not
do. So each submit adds the job's id to a sorted set scored by its creation time
(`CREATED_INDEX`), and a listing reads that set newest first in pages, fetching the records
of one page at a time, until it has `limit` jobs of the statuses asked for. The jobs it
returns are summaries (broker/mapping.py `to_job(summary=True)`): no image is decoded.

Records expire on their own (SAQ's ttl), so the index may name jobs that are gone: a
listing drops those it meets, and each submit looks at the oldest few.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Collection
from typing import cast

from saq.queue.redis import RedisQueue

from diffusiond.broker.mapping import to_job
from diffusiond.broker.queue import CREATED_INDEX, cancel_key
from diffusiond.jobs.models import Job, JobStatus

FIRST_PAGE = 8  # ids read at first when no limit is given (or a status filter skips some)
MAX_PAGE = 512
PRUNED_AT_SUBMIT = 8  # the oldest ids whose records a submit checks are still there


class CreatedIndex:
    """Job ids by creation time, in Redis, and the listing that reads them."""

    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue

    async def add(self, job_id: str, created_ms: int) -> None:
        """Index a job just enqueued, and drop the oldest ids whose records expired."""
        redis = self._queue.redis
        await redis.zadd(CREATED_INDEX, {job_id: created_ms})
        oldest = await cast(
            Awaitable[builtins.list[bytes]], redis.zrange(CREATED_INDEX, 0, PRUNED_AT_SUBMIT - 1)
        )
        if oldest:
            async with redis.pipeline(transaction=False) as pipe:
                for raw_id in oldest:
                    pipe.exists(self._queue.job_id(raw_id.decode()))
                present = await pipe.execute()
            await self._drop([i for i, kept in zip(oldest, present, strict=True) if not kept])

    async def newest(
        self, statuses: Collection[JobStatus] | None, limit: int | None
    ) -> builtins.list[Job]:
        """Up to `limit` jobs of `statuses` (any when None), newest first, as summaries."""
        redis = self._queue.redis
        found: builtins.list[Job] = []
        gone: builtins.list[bytes] = []
        start = 0
        page = limit if limit is not None and statuses is None else FIRST_PAGE
        while limit is None or len(found) < limit:
            page = max(1, min(page, MAX_PAGE))
            ids = await cast(
                Awaitable[builtins.list[bytes]],
                redis.zrevrange(CREATED_INDEX, start, start + page - 1),
            )
            if not ids:
                break
            start += len(ids)
            keys = [raw_id.decode() for raw_id in ids]
            values = await redis.mget(
                [self._queue.job_id(key) for key in keys] + [cancel_key(key) for key in keys]
            )
            records, marks = values[: len(keys)], values[len(keys) :]
            for raw_id, record, mark in zip(ids, records, marks, strict=True):
                saq_job = self._queue.deserialize(record) if record is not None else None
                if saq_job is None:
                    gone.append(raw_id)
                    continue
                job = to_job(saq_job, int(mark) if mark is not None else None, summary=True)
                if statuses is None or job.status in statuses:
                    found.append(job)
                    if limit is not None and len(found) >= limit:
                        break
            page *= 2
        await self._drop(gone)
        return found

    async def _drop(self, ids: builtins.list[bytes]) -> None:
        if ids:
            await self._queue.redis.zrem(CREATED_INDEX, *ids)
