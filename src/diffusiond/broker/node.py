"""An API node's view of the broker: `BrokerRegistry` (reads jobs) and `BrokerEngine`
(admits, cancels, reports), the protocols of diffusiond.api.ports over SAQ on Redis.

Every API node is stateless apart from caches: any node answers for any job.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Collection
from typing import Any, cast

from redis.exceptions import RedisError
from saq.job import Job as SaqJob
from saq.job import Status
from saq.queue.redis import RedisQueue
from saq.types import WorkerStats

from diffusiond.backends.base import BackendInfo
from diffusiond.broker.bridge import LoopThread
from diffusiond.broker.listing import CreatedIndex
from diffusiond.broker.mapping import request_to_json, to_job
from diffusiond.broker.queue import (
    ADMISSION_LOCK,
    CANCEL_REASON,
    JOB_FUNCTION,
    JobOptions,
    cancel_key,
)
from diffusiond.engine.admission import Admission
from diffusiond.engine.engine import EngineStats
from diffusiond.engine.run import retry_after_s
from diffusiond.errors import AlreadyTerminal, NotFound, ServerBusy
from diffusiond.jobs.ids import new_generation_id
from diffusiond.jobs.models import GenerationRequest, Job, JobChanged, JobListener, JobStatus

log = logging.getLogger(__name__)

_CACHED_TERMINAL = 16
WATCH_RETRY_S = 0.1  # the first wait before subscribing again, doubled up to the max
WATCH_RETRY_MAX_S = 5.0

# DELETE, atomically: refuse a missing or finished job, else leave the cancel mark.
_CANCEL_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 'missing' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'cancelled' end
local status = cjson.decode(raw)['status']
if status == 'complete' or status == 'failed' or status == 'aborted' then return 'terminal' end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 'ok'
"""

# What a notification says of a job: enough to tell a status change.
_COARSE = {
    Status.NEW.value: JobStatus.PENDING,
    Status.QUEUED.value: JobStatus.PENDING,
    Status.ACTIVE.value: JobStatus.IN_PROGRESS,
    Status.ABORTING.value: JobStatus.IN_PROGRESS,
}
_WORKER_FIELDS = (
    "host",
    "pid",
    "backend",
    "model",
    "device",
    "dtype",
    "architecture",
    "models",
    "components",
    "offload",
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BrokerRegistry:
    """Jobs as SAQ stores them in Redis, mapped to diffusiond's `Job` (broker/mapping.py).

    Listeners hear of changes through Redis pub/sub: SAQ publishes a job's status on its
    own channel at every write (every progress step, start, end, abort). The notification
    carries the id and a coarse status only, enough for a `JobChanged` (a listener that
    needs more re-reads the job); no API node polls Redis for changes. Redis expires
    finished jobs on its own, so no deletion is reported.
    """

    blocks_event_loop = True  # each call waits on Redis: api/ports.py `Offload`

    def __init__(self, bridge: LoopThread, queue: RedisQueue) -> None:
        self._bridge = bridge
        self._queue = queue
        self._listeners: list[JobListener] = []
        self._statuses: dict[str, JobStatus] = {}
        self._terminal: OrderedDict[str, Job] = OrderedDict()
        self.index = CreatedIndex(queue)

    def add_listener(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    def get(self, job_id: str) -> Job:
        return self._bridge.call(self.fetch(job_id))

    def exists(self, job_id: str) -> bool:
        return self._bridge.call(self._exists(job_id))

    async def _exists(self, job_id: str) -> bool:
        return bool(await self._queue.redis.exists(self._queue.job_id(job_id)))

    def list(
        self, statuses: Collection[JobStatus] | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """Newest first, as summaries (no progress, no result): see broker/listing.py."""
        return self._bridge.call(self.index.newest(statuses, limit))

    async def fetch(self, job_id: str) -> Job:
        """The job now (on the bridge loop); NotFound when unknown or expired."""
        redis = self._queue.redis
        cached = self._terminal.get(job_id)
        if cached is not None:  # terminal jobs never change; only their expiry is checked
            if await redis.exists(self._queue.job_id(job_id)):
                self._terminal.move_to_end(job_id)
                return cached
            del self._terminal[job_id]
        raw, mark = await redis.mget([self._queue.job_id(job_id), cancel_key(job_id)])
        saq_job = self._queue.deserialize(raw)
        if saq_job is None:
            raise NotFound(f"no generation with id {job_id!r} (unknown or expired)")
        job = to_job(saq_job, int(mark) if mark is not None else None)
        if job.status.is_terminal():
            self._terminal[job_id] = job
            if len(self._terminal) > _CACHED_TERMINAL:
                self._terminal.popitem(last=False)
        return job

    async def watch(self) -> None:
        """Relay SAQ's job notifications to the listeners until cancelled (bridge loop).

        When Redis goes away (a restart, a network cut) the subscription is made again, at
        growing intervals (WATCH_RETRY_S up to WATCH_RETRY_MAX_S), logged once per outage;
        once back, every waiter is woken, since notifications sent meanwhile are lost.
        """
        retry_s = WATCH_RETRY_S
        lost = False
        while True:
            try:
                async with contextlib.aclosing(self._notifications()) as notifications:
                    async for message in notifications:
                        if lost:
                            log.info("broker notifications resumed")
                            lost, retry_s = False, WATCH_RETRY_S
                            self._wake_all()
                        if message is not None:
                            self._relay(*message)
            except (RedisError, OSError) as exc:
                if not lost:
                    log.warning("broker notifications lost (%s): reconnecting", exc)
                    lost = True
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, WATCH_RETRY_MAX_S)

    async def _notifications(self) -> AsyncGenerator[tuple[str, str] | None, None]:
        """None once subscribed, then (channel, SAQ status) per notification, until Redis
        fails (its error raised)."""
        pubsub = self._queue.redis.pubsub()
        try:
            await pubsub.psubscribe(self._queue.job_id("*"))
            yield None
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is not None and message["type"] == "pmessage":
                    yield message["channel"].decode(), message["data"].decode()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _wake_all(self) -> None:
        change = JobChanged("", status_changed=True)  # a status change wakes every waiter
        for listener in self._listeners:
            listener(change)

    def _relay(self, channel: str, saq_status: str) -> None:
        job_id = self._queue.job_key_from_id(channel)
        after = _COARSE.get(saq_status, JobStatus.COMPLETE)
        before = self._statuses.pop(job_id, JobStatus.PENDING)
        if not after.is_terminal():
            self._statuses[job_id] = after
        change = JobChanged(job_id, status_changed=before is not after)
        for listener in self._listeners:
            listener(change)


class BrokerEngine(Admission):
    """Admission, cancel and health over the shared queue.

    A job is admitted while fewer than (live workers + IMAGE_MAX_QUEUE) jobs are queued or
    running, counted in Redis under a short Redis lock, so that API nodes admitting at the
    same moment cannot overfill the queue together.
    """

    blocks_event_loop = True  # each call waits on Redis: api/ports.py `Offload`

    def __init__(
        self,
        bridge: LoopThread,
        queue: RedisQueue,
        registry: BrokerRegistry,
        *,
        options: JobOptions,
        max_queue: int,
    ) -> None:
        super().__init__(max_queue)
        self._bridge = bridge
        self._queue = queue
        self._registry = registry
        self._options = options

    # -- state --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return True  # a node is started only once Redis answered; a lost Redis is a 503

    @property
    def load_error(self) -> str | None:
        return None

    def drain(self) -> None:
        self._draining = True

    def stats(self) -> EngineStats:
        queued, active, workers = self._bridge.call(self._counts())
        return EngineStats(running=active, admitted=queued + active, max_concurrent=workers)

    def info(self) -> BackendInfo:
        """The first worker's model; `models`: those loaded on any worker."""
        workers = self._bridge.call(self._workers())
        loaded = sorted({str(model) for worker in workers for model in worker.get("models") or ()})
        for worker in workers:
            if worker.get("model"):
                return BackendInfo(
                    str(worker.get("backend", "?")),
                    str(worker["model"]),
                    str(worker.get("device", "?")),
                    str(worker.get("dtype", "?")),
                    str(worker.get("architecture", "unknown")),
                    models=tuple(loaded),
                    components=_components(worker.get("components")),
                    offload=str(worker.get("offload", "none")),
                )
        return BackendInfo("none", "no worker connected", "-", "-")

    def health_extra(self) -> dict[str, object]:
        return {"mode": "broker", "workers": self._bridge.call(self._workers())}

    def queue_position(self, job_id: str) -> int | None:
        queued = self._bridge.call(self._queued_ids())
        wanted = self._queue.job_id(job_id).encode()
        return queued.index(wanted) + 1 if wanted in queued else None

    # -- actions ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Job:
        # This node is going away; other nodes may still admit: try again at once.
        self._refuse_if_draining(lambda: retry_after_s([]))
        return self._bridge.call(self._submit(request))

    def cancel(self, job_id: str) -> Job:
        self._bridge.call(self._cancel(job_id))
        return self._registry.get(job_id)

    async def _submit(self, request: GenerationRequest) -> Job:
        redis = self._queue.redis
        async with redis.lock(ADMISSION_LOCK, timeout=5, blocking_timeout=5):
            queued, active, workers = await self._counts()
            if queued + active >= workers + self._max_queue:
                retry_after = retry_after_s(await self._time_left_ms())
                raise ServerBusy(self._busy_message(workers), retry_after_s=retry_after)
            job = SaqJob(
                function=JOB_FUNCTION,
                kwargs={"request": request_to_json(request)},
                key=new_generation_id(_now_ms()),
                timeout=self._options.timeout_s,
                heartbeat=self._options.heartbeat_s,
                retries=self._options.retries,
                ttl=self._options.ttl_s,
            )
            await self._queue.enqueue(job)
            await self._registry.index.add(job.key, job.queued)
        return to_job(job, None)

    async def _cancel(self, job_id: str) -> None:
        redis = self._queue.redis
        outcome = await cast(
            Awaitable[Any],
            redis.eval(
                _CANCEL_SCRIPT,
                2,
                self._queue.job_id(job_id),
                cancel_key(job_id),
                str(_now_ms()),
                str(self._options.cancel_mark_ttl_s),
            ),
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome == "missing":
            raise NotFound(f"no generation with id {job_id!r} (unknown or expired)")
        if outcome == "terminal":
            job = await self._registry.fetch(job_id)
            raise AlreadyTerminal(
                f"generation {job_id} is already {job.status.value}; it cannot be cancelled"
            )
        if outcome == "ok":
            saq_job = await self._queue.job(job_id)
            if saq_job is not None and saq_job.status not in (Status.COMPLETE, Status.FAILED):
                # Dequeued at once if it waits; if it runs, its worker stops it at its next
                # step (it reads the mark) or when SAQ's abort reaches it, whichever is first.
                await self._queue.abort(saq_job, CANCEL_REASON)
                await redis.expire(self._queue.job_id(job_id), self._options.cancel_mark_ttl_s)

    async def _queued_ids(self) -> builtins.list[bytes]:
        ids = await cast(
            Awaitable[builtins.list[bytes]],
            self._queue.redis.lrange(self._queue.namespace("queued"), 0, -1),
        )
        return ids

    async def _counts(self) -> tuple[int, int, int]:
        redis = self._queue.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.llen(self._queue.namespace("queued"))
            pipe.llen(self._queue.namespace("active"))
            pipe.zcount(self._queue.namespace("stats"), _now_ms(), "+inf")
            queued, active, workers = await pipe.execute()
        return int(queued), int(active), int(workers)

    async def _workers(self) -> builtins.list[dict[str, Any]]:
        info = await self._queue.info()
        found: builtins.list[dict[str, Any]] = []
        for worker_id, worker in sorted(info["workers"].items()):
            metadata: dict[str, Any] = worker.get("metadata") or {}
            entry: dict[str, Any] = {"id": worker_id}
            entry |= {key: metadata[key] for key in _WORKER_FIELDS if key in metadata}
            stats: WorkerStats | None = worker["stats"]
            if stats is not None:
                entry |= {"completed": stats["complete"], "uptimeMs": stats["uptime"]}
            found.append(entry)
        return found

    def _busy_message(self, workers: int) -> str:
        if workers == 0:
            room = f"no worker is connected and the {self._max_queue} queue place(s) are taken"
            return room if self._max_queue else "no worker is connected to the queue"
        room = f", and all {self._max_queue} queue place(s) are taken" if self._max_queue else ""
        return f"all {workers} worker(s) are busy{room}"

    async def _time_left_ms(self) -> builtins.list[float | None]:
        """Each running job's time left: the etaMs its worker last wrote, less the time
        since it wrote it (engine/run.py says why an API node goes by this)."""
        ids = await cast(
            Awaitable[builtins.list[bytes]],
            self._queue.redis.lrange(self._queue.namespace("active"), 0, -1),
        )
        records = await self._queue.redis.mget(ids) if ids else []
        now = _now_ms()
        left: builtins.list[float | None] = []
        for record in records:
            saq_job = self._queue.deserialize(record)
            eta = ((saq_job.meta or {}).get("progress") or {}).get("eta") if saq_job else None
            left.append(None if eta is None or saq_job is None else eta - (now - saq_job.touched))
        return left

    async def sweep(self, interval_s: int) -> None:
        """End jobs of workers whose heartbeat lapsed, even when no worker is left to."""
        while True:
            try:
                swept = await self._queue.sweep(lock=interval_s, abort=1.0)
                if swept:
                    log.warning("jobs of lost workers ended as WORKER_LOST: %s", swept)
            except (RedisError, OSError) as exc:
                log.warning("broker sweep failed: %s", exc)
            await asyncio.sleep(interval_s)


def _components(published: object) -> tuple[tuple[str, str], ...]:
    """A worker's published {role: file name}, as BackendInfo keeps it."""
    if not isinstance(published, dict):
        return ()
    return tuple((str(role), str(name)) for role, name in published.items())
