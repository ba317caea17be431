"""The ASGI application: routes, each a few lines from request to engine to response."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from diffusiond.api import errors
from diffusiond.api.a1111.routes import a1111_mount
from diffusiond.api.bodies import RenderedBodies
from diffusiond.api.events import JobEvents, JobFeed, last_event_id, wait_preference
from diffusiond.api.health import check_ready, health_body
from diffusiond.api.idempotency import IdempotencyKeys, check_idempotency_key
from diffusiond.api.limits import StreamSlots
from diffusiond.api.model_list import models_body, plugin_models_body
from diffusiond.api.openapi import openapi_document
from diffusiond.api.params import read_uint, shown
from diffusiond.api.ports import (
    JobRunner,
    JobSource,
    LoraPort,
    ModelDirectory,
    Offload,
    check_for_model,
)
from diffusiond.api.request_body import read_body
from diffusiond.api.schemas import (
    DEFAULT_MAX_PIXELS,
    dump,
    parse_generation_request,
    parse_list_query,
    summary_body,
)
from diffusiond.api.security import (
    BearerKeyMiddleware,
    HostPolicy,
    SameSiteMiddleware,
    carries_key,
)
from diffusiond.backends.lora_files import LoraCatalog, LoraChoices
from diffusiond.compat.openai.errors import unauthorized as openai_unauthorized
from diffusiond.compat.openai.routes import PREFIX as OPENAI_PREFIX
from diffusiond.compat.openai.routes import OpenAILimits, openai_routes
from diffusiond.errors import (
    DiffusiondError,
    NotFound,
)
from diffusiond.jobs.models import GenerationRequest, Job, JobStatus
from diffusiond.sampling import samplers_body
from diffusiond.web import web_routes

if TYPE_CHECKING:
    from diffusiond.settings import Settings

# The body limit of a route that takes a body; POST /v1/images/generations has its own,
# larger one (`--max-body-bytes`), as its body may carry images.
MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_GENERATION_BODY_BYTES = 24 * 1024 * 1024

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class ApiConfig:
    max_batch: int
    poll_interval_ms: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_body_bytes: int = DEFAULT_MAX_GENERATION_BODY_BYTES  # of POST /v1/images/generations
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    bound_host: str = "127.0.0.1"  # the address listened on: its Host is always allowed
    allowed_hosts: tuple[str, ...] = ()  # further Host names (".domain", "*")
    max_streams: int = 64  # event streams and Prefer: wait requests open at once
    heartbeat_s: float = 15.0  # a comment line on idle event streams
    event_interval_s: float = 0.1  # progress events of one stream at most 10 a second

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiConfig:
        return cls(
            max_batch=settings.max_batch,
            poll_interval_ms=settings.poll_interval_ms,
            max_pixels=settings.max_pixels,
            max_body_bytes=settings.max_body_bytes,
            api_key=settings.api_key,
            cors_origins=settings.cors_origins,
            bound_host=settings.host,
            allowed_hosts=settings.allowed_hosts,
            max_streams=settings.max_streams,
            heartbeat_s=settings.sse_heartbeat_ms / 1000,
        )


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers=headers, media_type="application/json")


class _HeldStream(StreamingResponse):
    """A stream that holds one of the open-stream slots until it is done, however it ends
    (the client may leave before the first byte: the slot still comes back)."""

    def __init__(
        self, content: AsyncIterator[bytes], *, release: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Endpoints:
    def __init__(
        self,
        registry: JobSource,
        engine: JobRunner,
        config: ApiConfig,
        events: JobEvents,
        bodies: RenderedBodies,
        *,
        loras: LoraPort,
        models: ModelDirectory | None,
    ) -> None:
        self._registry = registry
        self._loras = loras
        self._models = models
        self._engine = engine
        self._config = config
        self._events = events
        self._bodies = bodies
        self._openapi: bytes | None = None
        self._keys = IdempotencyKeys(registry.exists)
        registry.add_listener(self._keys.on_change)
        self._slots = StreamSlots(config.max_streams)
        self._offload = Offload(registry, engine)  # every port call below goes through it
        self._keys_lock = asyncio.Lock()  # IdempotencyKeys is not thread-safe: one at a time
        self._feed = JobFeed(
            registry,
            events,
            render=self._render,
            queue_position=engine.queue_position,
            heartbeat_s=config.heartbeat_s,
            event_interval_s=config.event_interval_s,
            offload=self._offload,
        )

    # One route per path, so a wrong method's 405 lists every method the path allows.
    async def generations(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.create(request)
        return await self._offload(self.list, request)

    async def generation(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        if request.method == "DELETE":
            job = await self._offload(self._engine.cancel, job_id)
            return _json(dump({"id": job.id, "status": job.status.value}))
        return _json(await self._offload(self._render_by_id, job_id))

    def _render_by_id(self, job_id: str) -> bytes:
        return self._render(self._registry.get(job_id))

    def _render(self, job: Job) -> bytes:
        position = self._engine.queue_position(job.id) if job.status is JobStatus.PENDING else None
        return self._bodies.render(job, position)

    async def create(self, request: Request) -> Response:
        body = await read_body(request, self._config.max_body_bytes)
        parse = functools.partial(
            parse_generation_request,
            body,
            max_batch=self._config.max_batch,
            max_pixels=self._config.max_pixels,
        )
        # A body with images takes milliseconds to check (base64, a full decode): off the
        # event loop, so that polls and streams of other jobs are not held up meanwhile.
        parsed = parse() if len(body) <= MAX_BODY_BYTES else await asyncio.to_thread(parse)
        if self._models is not None:
            # An id not seen before rescans the models dir: off the event loop.
            await asyncio.to_thread(check_for_model, self._models, parsed)
        if parsed.loras:  # reads the LoRA folder (and, in broker mode, Redis): off the loop
            await asyncio.to_thread(self._loras.check, parsed.model, parsed.loras)
        raw_key = request.headers.get("idempotency-key")
        key = check_idempotency_key(raw_key) if raw_key is not None else None
        wait_s = wait_preference(request)
        if not wait_s:
            return await self._start(parsed, key, wait_s)
        with self._slots.held():  # refused before anything starts when every slot is held
            return await self._start(parsed, key, wait_s)

    async def _start(
        self, parsed: GenerationRequest, key: str | None, wait_s: int | None
    ) -> Response:
        headers: dict[str, str] = {}
        if wait_s is not None:
            headers["Preference-Applied"] = f"wait={wait_s}"
        replayed = None
        if key is not None:
            async with self._keys_lock:
                replayed = await self._offload(self._keys.replay, key, parsed)
        if replayed is not None:
            job = await self._offload(self._registry.get, replayed)
            headers |= {
                "Location": f"/v1/images/generations/{job.id}",
                "Idempotent-Replayed": "true",
            }
            if wait_s:
                job = await self._feed.wait_terminal(job, wait_s)
            return _json(await self._offload(self._render, job), 200, headers)
        job = await self._offload(self._engine.submit, parsed)
        if key is not None:
            async with self._keys_lock:
                await self._offload(self._keys.remember, key, parsed, job.id)
        headers["Location"] = f"/v1/images/generations/{job.id}"
        if wait_s:
            job = await self._feed.wait_terminal(job, wait_s)
            if job.status.is_terminal():
                return _json(await self._offload(self._render, job), 200, headers)
        created = {"id": job.id, "status": job.status.value, "createdAt": job.created_at}
        return _json(dump(created), 201, headers)

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        await self._offload(self._registry.get, job_id)  # an unknown id: 404 before a stream
        stream = self._feed.stream(job_id, last_event_id(request))
        self._slots.take()
        return _HeldStream(
            stream,
            release=self._slots.give_back,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def image(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        raw_index = request.path_params["index"]
        job = await self._offload(self._registry.get, job_id)
        if job.result is None:
            raise NotFound(
                f"generation {job_id} is {job.status.value}: its images exist only once it is "
                "complete"
            )
        count = len(job.result.images)
        index = read_uint(raw_index)
        if index is None or index >= count:
            raise NotFound(
                f"generation {job_id} has images 0 to {count - 1}, not {shown(raw_index)}"
            )
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

    async def loras(self, _request: Request) -> Response:
        return _json(dump({"loras": await asyncio.to_thread(self._loras.listing)}))

    async def openapi(self, _request: Request) -> Response:
        if self._openapi is None:
            self._openapi = dump(
                openapi_document(
                    max_batch=self._config.max_batch, secured=self._config.api_key is not None
                )
            )
        return _json(self._openapi)

    async def models(self, request: Request) -> Response:
        api_key = self._config.api_key
        with_paths = api_key is not None and carries_key(request.headers, api_key)
        info = await self._offload(self._engine.info)
        if self._models is None:
            body = plugin_models_body(info)
        else:  # a rescan of the models dir: off the event loop
            body = await asyncio.to_thread(
                models_body, self._models, info.models, with_paths=with_paths
            )
        return _json(dump(body))

    async def samplers(self, _request: Request) -> Response:
        return _json(dump(samplers_body()))

    async def health(self, request: Request) -> Response:
        api_key = self._config.api_key
        full = api_key is None or carries_key(request.headers, api_key)
        check_ready(self._engine, full=full)
        body = await self._offload(
            health_body,
            self._engine,
            poll_interval_ms=self._config.poll_interval_ms,
            max_batch=self._config.max_batch,
            open_streams=self._slots.open,
            full=full,
        )
        return _json(dump(body))


def create_app(
    registry: JobSource,
    engine: JobRunner,
    config: ApiConfig,
    lifespan: Lifespan | None = None,
    events: JobEvents | None = None,
    *,
    loras: LoraPort | None = None,
    models: ModelDirectory | None = None,
) -> Starlette:
    """The HTTP API of docs/API.md over a registry and an engine; `models` checks the
    `model` of each request and lists them (None: the backend is a plugin with one model,
    and any `model` goes to it); `loras` is what requests' LoRAs are listed and checked
    against (None: no LoRAs)."""
    events = events if events is not None else JobEvents()
    bodies = RenderedBodies()
    registry.add_listener(events.on_change)
    registry.add_listener(bodies.on_change)
    if loras is None:
        loras = LoraChoices(LoraCatalog(None), lambda _model: engine.info().architecture)
    endpoints = _Endpoints(registry, engine, config, events, bodies, loras=loras, models=models)
    routes = [
        Route("/v1/images/generations", endpoints.generations, methods=["GET", "POST"]),
        Route("/v1/images/generations/{id}", endpoints.generation, methods=["GET", "DELETE"]),
        Route("/v1/images/generations/{id}/events", endpoints.events, methods=["GET"]),
        Route("/v1/images/generations/{id}/images/{index}", endpoints.image, methods=["GET"]),
        Route("/v1/loras", endpoints.loras, methods=["GET"]),
        Route("/v1/models", endpoints.models, methods=["GET"]),
        Route("/v1/samplers", endpoints.samplers, methods=["GET"]),
        Route("/health", endpoints.health, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi, methods=["GET"]),
        *openai_routes(
            registry,
            engine,
            events,
            OpenAILimits(
                config.max_batch, config.max_pixels, config.max_body_bytes, config.heartbeat_s
            ),
            models,
        ),
        a1111_mount(  # /sdapi/v1: docs/API.md
            registry,
            engine,
            events,
            max_batch=config.max_batch,
            max_pixels=config.max_pixels,
            max_body_bytes=config.max_body_bytes,
            models=models,
            loras=loras,
        ),
        *web_routes(),
    ]
    # Outermost: a request for a foreign Host or from a foreign Origin goes no further.
    middleware = [
        Middleware(
            SameSiteMiddleware,
            hosts=HostPolicy(config.bound_host, config.allowed_hosts),
            cors_origins=config.cors_origins,
        )
    ]
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
        middleware.append(
            Middleware(
                BearerKeyMiddleware,
                api_key=config.api_key,
                dialects={f"{OPENAI_PREFIX}/": openai_unauthorized},
            )
        )
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
