"""The ASGI application: routes, each a few lines from request to engine to response."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from diffusiond import __version__
from diffusiond.api import errors
from diffusiond.api.live import IdempotencyKeys, JobEvents, check_idempotency_key
from diffusiond.api.openapi import openapi_document
from diffusiond.api.ports import JobRunner, JobSource
from diffusiond.api.schemas import (
    DEFAULT_MAX_PIXELS,
    dump,
    job_body,
    parse_generation_request,
    parse_list_query,
    summary_body,
)
from diffusiond.api.security import BearerKeyMiddleware
from diffusiond.errors import DiffusiondError, NotFound, PayloadTooLarge, ServerNotReady
from diffusiond.jobs.models import Job, JobStatus
from diffusiond.web import web_routes

if TYPE_CHECKING:
    from diffusiond.settings import Settings

MAX_BODY_BYTES = 64 * 1024
_CACHED_BODIES = 16

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


MAX_WAIT_S = 60  # the longest `Prefer: wait=N` honoured


@dataclass(frozen=True)
class ApiConfig:
    max_batch: int
    poll_interval_ms: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    heartbeat_s: float = 15.0  # a comment line on idle event streams
    event_interval_s: float = 0.1  # progress events of one stream at most 10 a second

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiConfig:
        return cls(
            max_batch=settings.max_batch,
            poll_interval_ms=settings.poll_interval_ms,
            max_pixels=settings.max_pixels,
            api_key=settings.api_key,
            cors_origins=settings.cors_origins,
            heartbeat_s=settings.sse_heartbeat_ms / 1000,
        )


class _TerminalBodyCache:
    """Rendered bodies: a terminal job's never changes (base64 and JSON happen once), and a
    live job's is kept until its next change."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._live: OrderedDict[str, tuple[tuple[int, int | None], bytes]] = OrderedDict()

    def render(self, job: Job, queue_position: int | None = None) -> bytes:
        if not job.status.is_terminal():
            # A running job's body changes with its version (or its queue position): render
            # it once per change, however many pollers and event streams read it.
            key = (job.version, queue_position)
            live = self._live.get(job.id)
            if live is not None and live[0] == key:
                return live[1]
            body = dump(job_body(job, queue_position))
            self._live[job.id] = (key, body)
            if len(self._live) > self._size * 4:
                self._live.popitem(last=False)
            return body
        self._live.pop(job.id, None)
        final = self._bodies.get(job.id)
        if final is None:
            final = dump(job_body(job))
            self._bodies[job.id] = final
            if len(self._bodies) > self._size:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(job.id)
        return final


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers=headers, media_type="application/json")


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_preference(request: Request) -> int | None:
    """N of `Prefer: wait=N` (RFC 7240), at most MAX_WAIT_S; None when absent or malformed
    (a preference a server cannot read is one it may ignore)."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.strip().partition("=")
            if name.strip().lower() == "wait" and value.strip().isdigit():
                return min(int(value.strip()), MAX_WAIT_S)
    return None


def _event(event_id: int, name: str, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, name.encode(), data)


def _last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id", "").strip()
    return int(raw) if raw.isdigit() else None


class _Endpoints:
    def __init__(
        self, registry: JobSource, engine: JobRunner, config: ApiConfig, events: JobEvents
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._config = config
        self._events = events
        self._cache = _TerminalBodyCache(_CACHED_BODIES)
        self._openapi: bytes | None = None
        self._keys = IdempotencyKeys(registry.exists)

    # One route per path, so a wrong method's 405 lists every method the path allows.
    async def generations(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.create(request)
        return self.list(request)

    async def generation(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        if request.method == "DELETE":
            job = self._engine.cancel(job_id)
            return _json(dump({"id": job.id, "status": job.status.value}))
        return _json(self._render(self._registry.get(job_id)))

    def _render(self, job: Job) -> bytes:
        position = self._engine.queue_position(job.id) if job.status is JobStatus.PENDING else None
        return self._cache.render(job, position)

    async def create(self, request: Request) -> Response:
        body = await _read_body(request)
        parsed = parse_generation_request(
            body, max_batch=self._config.max_batch, max_pixels=self._config.max_pixels
        )
        raw_key = request.headers.get("idempotency-key")
        key = check_idempotency_key(raw_key) if raw_key is not None else None
        wait_s = _wait_preference(request)
        headers: dict[str, str] = {}
        if wait_s is not None:
            headers["Preference-Applied"] = f"wait={wait_s}"
        replayed = self._keys.replay(key, parsed) if key is not None else None
        if replayed is not None:
            job = self._registry.get(replayed)
            headers |= {
                "Location": f"/v1/images/generations/{job.id}",
                "Idempotent-Replayed": "true",
            }
            if wait_s:
                job = await self._wait_terminal(job, wait_s)
            return _json(self._render(job), 200, headers)
        job = self._engine.submit(parsed)
        if key is not None:
            self._keys.remember(key, parsed, job.id)
        headers["Location"] = f"/v1/images/generations/{job.id}"
        if wait_s:
            job = await self._wait_terminal(job, wait_s)
            if job.status.is_terminal():
                return _json(self._render(job), 200, headers)
        created = {"id": job.id, "status": job.status.value, "createdAt": job.created_at}
        return _json(dump(created), 201, headers)

    async def _wait_terminal(self, job: Job, wait_s: float) -> Job:
        """The job once terminal, or as it is after `wait_s` seconds; woken by changes."""
        deadline = asyncio.get_running_loop().time() + wait_s
        with self._events.subscribe(job.id) as changed:
            while True:
                changed.clear()
                job = self._registry.get(job.id)
                left = deadline - asyncio.get_running_loop().time()
                if job.status.is_terminal() or left <= 0 or self._events.closed:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        self._registry.get(job_id)  # an unknown id is a 404 before any stream starts
        stream = self._stream(job_id, _last_event_id(request))
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, job_id: str, last_id: int | None) -> AsyncIterator[bytes]:
        """`progress` events while the job moves, then its final event, then the end.

        Each event carries the body a GET would return and the job's version as its id; a
        client resuming with Last-Event-ID gets only newer states, and always the final one.
        Progress events are at least `min_interval_s` apart (the newest state is sent; the
        ones in between are skipped); the final event is never held back.
        """
        loop = asyncio.get_running_loop()
        sent: tuple[int, int | None] | None = None
        sent_at = -math.inf
        with self._events.subscribe(job_id) as changed:
            while not self._events.closed:
                changed.clear()
                try:
                    job = self._registry.get(job_id)
                except NotFound:
                    return  # evicted or expired while followed: nothing more to say
                if job.status.is_terminal():
                    yield _event(job.version, job.status.value, self._render(job))
                    return
                position = self._engine.queue_position(job_id)
                resumed = last_id is not None and sent is None and job.version <= last_id
                if not resumed and sent != (job.version, position):
                    early = sent_at + self._config.event_interval_s - loop.time()
                    if early > 0:  # too soon after the last event: wait, unless it ends
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(changed.wait(), early)
                        continue
                    yield _event(job.version, "progress", self._render(job))
                    sent, sent_at = (job.version, position), loop.time()
                elif resumed:
                    sent = (job.version, position)
                try:
                    await asyncio.wait_for(changed.wait(), self._config.heartbeat_s)
                except TimeoutError:
                    yield b": heartbeat\n\n"

    async def image(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        raw_index = request.path_params["index"]
        job = self._registry.get(job_id)
        if job.result is None:
            raise NotFound(
                f"generation {job_id} is {job.status.value}: its images exist only once it is "
                "complete"
            )
        count = len(job.result.images)
        if not raw_index.isdigit() or int(raw_index) >= count:
            raise NotFound(f"generation {job_id} has images 0 to {count - 1}, not {raw_index!r}")
        index = int(raw_index)
        image = job.result.images[index]
        name = f"{job_id}-{index}-seed{image.seed}.png"
        return Response(
            image.png,
            media_type="image/png",
            headers={
                "Content-Disposition": f'inline; filename="{name}"',
                "Cache-Control": "private, max-age=31536000, immutable",
            },
        )

    def list(self, request: Request) -> Response:
        query = request.query_params
        statuses, limit = parse_list_query(query.getlist("status"), query.getlist("limit"))
        jobs = self._registry.list(statuses, limit)
        return _json(dump({"generations": [summary_body(job) for job in jobs]}))

    async def openapi(self, _request: Request) -> Response:
        if self._openapi is None:
            self._openapi = dump(
                openapi_document(
                    max_batch=self._config.max_batch, secured=self._config.api_key is not None
                )
            )
        return _json(self._openapi)

    async def health(self, _request: Request) -> Response:
        engine = self._engine
        if not engine.ready:
            reason = engine.load_error
            raise ServerNotReady(
                f"the model failed to load: {reason}" if reason else "the model is still loading"
            )
        stats = engine.stats()
        info = engine.info()
        return _json(
            dump(
                {
                    "status": "ok",
                    "busy": stats.running > 0 or stats.admitted > 0,
                    "pollIntervalMs": self._config.poll_interval_ms,
                    "activeGenerations": stats.running,
                    "queueDepth": max(0, stats.admitted - stats.running),
                    "maxConcurrent": stats.max_concurrent,
                    "maxQueue": engine.max_queue,
                    "draining": engine.draining,
                    "maxBatch": self._config.max_batch,
                    "backend": info.name,
                    "model": info.model,
                    "device": info.device,
                    "dtype": info.dtype,
                    "architecture": info.architecture,
                    "version": __version__,
                    **engine.health_extra(),
                }
            )
        )


def create_app(
    registry: JobSource,
    engine: JobRunner,
    config: ApiConfig,
    lifespan: Lifespan | None = None,
    events: JobEvents | None = None,
) -> Starlette:
    """The HTTP API of ../shared/API.md over a registry and an engine."""
    events = events if events is not None else JobEvents()
    registry.add_listener(events.on_change)
    endpoints = _Endpoints(registry, engine, config, events)
    routes = [
        Route("/v1/images/generations", endpoints.generations, methods=["GET", "POST"]),
        Route("/v1/images/generations/{id}", endpoints.generation, methods=["GET", "DELETE"]),
        Route("/v1/images/generations/{id}/events", endpoints.events, methods=["GET"]),
        Route("/v1/images/generations/{id}/images/{index}", endpoints.image, methods=["GET"]),
        Route("/health", endpoints.health, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi, methods=["GET"]),
        *web_routes(),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Idempotency-Key",
                    "Prefer",
                    "Last-Event-ID",
                ],
                expose_headers=[
                    "Location",
                    "Retry-After",
                    "Idempotent-Replayed",
                    "Preference-Applied",
                ],
                max_age=600,
            )
        )
    if config.api_key is not None:
        middleware.append(Middleware(BearerKeyMiddleware, api_key=config.api_key))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            DiffusiondError: errors.domain_error,
            HTTPException: errors.http_error,
            Exception: errors.internal_error,
        },
        lifespan=lifespan,
    )
