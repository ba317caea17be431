"""The ASGI application: routes, each a few lines from request to engine to response."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from diffusiond import __version__
from diffusiond.api import errors
from diffusiond.api.openapi import openapi_document
from diffusiond.api.schemas import (
    DEFAULT_MAX_PIXELS,
    dump,
    job_body,
    parse_generation_request,
    summary_body,
)
from diffusiond.api.security import BearerKeyMiddleware
from diffusiond.engine.engine import Engine
from diffusiond.errors import DiffusiondError, PayloadTooLarge, ServerNotReady
from diffusiond.jobs.models import Job
from diffusiond.jobs.registry import GenerationRegistry

MAX_BODY_BYTES = 64 * 1024
_CACHED_BODIES = 16

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class ApiConfig:
    max_batch: int
    poll_interval_ms: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()


class _TerminalBodyCache:
    """Rendered bodies of terminal jobs, which never change: base64 and JSON happen once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._bodies: OrderedDict[str, bytes] = OrderedDict()

    def render(self, job: Job) -> bytes:
        if not job.status.is_terminal():
            return dump(job_body(job))
        body = self._bodies.get(job.id)
        if body is None:
            body = dump(job_body(job))
            self._bodies[job.id] = body
            if len(self._bodies) > self._size:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(job.id)
        return body


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


class _Endpoints:
    def __init__(self, registry: GenerationRegistry, engine: Engine, config: ApiConfig) -> None:
        self._registry = registry
        self._engine = engine
        self._config = config
        self._cache = _TerminalBodyCache(_CACHED_BODIES)
        self._openapi: bytes | None = None

    # One route per path, so a wrong method's 405 lists every method the path allows.
    async def generations(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.create(request)
        return self.list()

    async def generation(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        if request.method == "DELETE":
            job = self._engine.cancel(job_id)
            return _json(dump({"id": job.id, "status": job.status.value}))
        return _json(self._cache.render(self._registry.get(job_id)))

    async def create(self, request: Request) -> Response:
        body = await _read_body(request)
        parsed = parse_generation_request(
            body, max_batch=self._config.max_batch, max_pixels=self._config.max_pixels
        )
        job = self._engine.submit(parsed)
        created = {"id": job.id, "status": job.status.value, "createdAt": job.created_at}
        return _json(dump(created), 201, {"Location": f"/v1/images/generations/{job.id}"})

    def list(self) -> Response:
        jobs = self._registry.list()
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
                    "maxBatch": self._config.max_batch,
                    "backend": info.name,
                    "model": info.model,
                    "device": info.device,
                    "dtype": info.dtype,
                    "architecture": info.architecture,
                    "version": __version__,
                }
            )
        )


def create_app(
    registry: GenerationRegistry,
    engine: Engine,
    config: ApiConfig,
    lifespan: Lifespan | None = None,
) -> Starlette:
    """The HTTP API of ../shared/API.md over a registry and an engine."""
    endpoints = _Endpoints(registry, engine, config)
    routes = [
        Route("/v1/images/generations", endpoints.generations, methods=["GET", "POST"]),
        Route("/v1/images/generations/{id}", endpoints.generation, methods=["GET", "DELETE"]),
        Route("/health", endpoints.health, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi, methods=["GET"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["Location", "Retry-After"],
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
