"""The OpenAI Images API's routes under /openai/v1, each a few lines from request to job.

Every request becomes an ordinary job, submitted through the same `JobRunner` as POST
/v1/images/generations (so it is listed, cancellable, persisted, and runs in broker mode
too). The call is synchronous for the client: the handler waits for the job's end, woken
by `JobEvents` (no polling), and a `HangUp` watches the ASGI receive channel meanwhile: a
client that goes away has its job cancelled, streaming or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from diffusiond.api.events import JobEvents
from diffusiond.api.params import shown
from diffusiond.api.ports import JobRunner, JobSource, ModelDirectory, Offload, check_for_model
from diffusiond.api.request_body import read_body
from diffusiond.compat.openai import answers
from diffusiond.compat.openai.errors import (
    INVALID,
    answers_in_openai_shape,
    error_response,
    job_error,
    job_error_body,
)
from diffusiond.compat.openai.models import (
    catalog_model,
    model_body,
    model_list_body,
    served_model_id,
)
from diffusiond.compat.openai.multipart import parse_form
from diffusiond.compat.openai.params import size_text
from diffusiond.compat.openai.requests import OpenAIRequest, parse_edit, parse_generation
from diffusiond.errors import AlreadyTerminal, InvalidRequest, NotFound
from diffusiond.jobs.models import Job, JobStatus, Preview

PREFIX = "/openai/v1"
_METHODS = {
    f"{PREFIX}/images/generations": ("POST",),
    f"{PREFIX}/images/edits": ("POST",),
    f"{PREFIX}/models": ("GET",),
}
MODEL_PATHS = f"{PREFIX}/models/"
MAX_JSON_BYTES = 64 * 1024
KEEP_ALIVE = b": keep-alive\n\n"
CLIENT_GONE = 499  # what a request whose client hung up is logged with (nobody reads it)


@dataclass(frozen=True)
class OpenAILimits:
    max_batch: int
    max_pixels: int
    max_body_bytes: int  # of an edit's multipart body (its images)
    heartbeat_s: float = 15.0  # a comment line on a quiet event stream


class HangUp:
    """Whether the client has gone: a task reads the receive channel (the body is already
    read, so only `http.disconnect` can come) and wakes every event it was handed."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._wakes: list[asyncio.Event] = []
        self._task: asyncio.Task[None] | None = None
        self.happened = False

    async def __aenter__(self) -> HangUp:
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    def wake(self, event: asyncio.Event) -> None:
        self._wakes.append(event)
        if self.happened:
            event.set()

    async def _listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.happened = True
        for event in self._wakes:
            event.set()


class _JobStream(StreamingResponse):
    """An event stream that runs `on_close` however it ends, even when the client leaves
    before the first byte."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        on_close: Callable[[], Awaitable[None]],
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class _Ended:
    """Whether a stream saw its job end (then there is nothing to cancel)."""

    def __init__(self) -> None:
        self.seen = False


class OpenAIImages:
    def __init__(
        self,
        registry: JobSource,
        engine: JobRunner,
        events: JobEvents,
        limits: OpenAILimits,
        models: ModelDirectory | None = None,
    ) -> None:
        self._models = models
        self._registry = registry
        self._engine = engine
        self._events = events
        self._limits = limits
        self._offload = Offload(registry, engine)
        self._created = int(time.time())  # the listed model's `created`: when it was served

    async def generations(self, request: Request) -> Response:
        body = await read_body(request, MAX_JSON_BYTES)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
        limits = self._limits
        ask = parse_generation(data, max_batch=limits.max_batch, max_pixels=limits.max_pixels)
        return await self._run(request, ask)

    async def edits(self, request: Request) -> Response:
        body = await read_body(request, self._limits.max_body_bytes)
        content_type = request.headers.get("content-type", "")
        # Splitting the form and checking its images takes milliseconds: off the event loop.
        ask = await asyncio.to_thread(self._parse_edit, content_type, body)
        return await self._run(request, ask)

    def _parse_edit(self, content_type: str, body: bytes) -> OpenAIRequest:
        form = parse_form(content_type, body)
        limits = self._limits
        return parse_edit(form, max_batch=limits.max_batch, max_pixels=limits.max_pixels)

    async def _model_ids(self) -> list[str]:
        """The catalog's ids (the models dir read again), or the plugin backend's one."""
        if self._models is None:
            return [served_model_id(await self._offload(self._engine.info))]
        entries = await asyncio.to_thread(self._models.entries)
        return [entry.id for entry in entries]

    async def models(self, _request: Request) -> Response:
        return _json(model_list_body(await self._model_ids(), self._created))

    async def model(self, request: Request) -> Response:
        model_ids = await self._model_ids()
        asked = request.path_params["model"]
        if asked not in model_ids:
            raise NotFound(f"no model {shown(asked)}: this server lists {', '.join(model_ids)}")
        return _json(model_body(asked, self._created))

    async def unknown(self, request: Request) -> Response:
        path = request.url.path
        allowed = _METHODS.get(path) or (("GET",) if path.startswith(MODEL_PATHS) else None)
        if allowed is not None:
            return error_response(
                405,
                f"{request.method} is not allowed on {path}: {', '.join(allowed)} is",
                INVALID,
                code="method_not_allowed",
                headers={"Allow": ", ".join(allowed)},
            )
        raise NotFound(
            f"no endpoint {request.method} {request.url.path}: this server offers POST "
            f"{PREFIX}/images/generations, POST {PREFIX}/images/edits and GET {PREFIX}/models"
        )

    async def _run(self, request: Request, ask: OpenAIRequest) -> Response:
        model = catalog_model(ask.model, await self._model_ids()) if self._models else None
        wanted = dataclasses.replace(ask.job, model=model)
        await asyncio.to_thread(check_for_model, self._models, wanted)
        job = await self._offload(self._engine.submit, wanted)
        if ask.answer.stream:
            ended = _Ended()
            return _JobStream(
                self._stream(job.id, ask, request.receive, ended),
                on_close=functools.partial(self._cancel_unless, job.id, ended),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        ended = _Ended()
        try:
            async with HangUp(request.receive) as hangup:
                done = await self._wait(job.id, hangup)
            ended.seen = done is not None
        finally:
            await self._cancel_unless(job.id, ended)  # hung up, or the wait itself failed
        if done is None:
            return Response(status_code=CLIENT_GONE)
        if done.status is not JobStatus.COMPLETE or done.result is None:
            return job_error(done)
        base = str(request.base_url).rstrip("/")
        body = await asyncio.to_thread(
            answers.images_body,
            done.result,
            ask.answer,
            int(time.time()),
            lambda index: f"{base}/v1/images/generations/{done.id}/images/{index}",
        )
        return _json(body)

    async def _wait(self, job_id: str, hangup: HangUp) -> Job | None:
        """The job once it ends; None as soon as the client has gone."""
        with self._events.subscribe(job_id) as changed:
            hangup.wake(changed)
            while True:
                changed.clear()
                job = await self._offload(self._registry.get, job_id)
                if job.status.is_terminal():
                    return job
                if hangup.happened:
                    return None
                await changed.wait()

    async def _stream(
        self, job_id: str, ask: OpenAIRequest, receive: Receive, ended: _Ended
    ) -> AsyncIterator[bytes]:
        """`<prefix>.partial_image` events from the job's previews (up to partial_images),
        then one `<prefix>.completed` per image, or an `error` event."""
        size = size_text(ask.job.width, ask.job.height)
        sent: set[tuple[int, int]] = set()
        async with HangUp(receive) as hangup:
            with self._events.subscribe(job_id) as changed:
                hangup.wake(changed)
                while not hangup.happened:
                    changed.clear()
                    job = await self._offload(self._registry.get, job_id)
                    if job.status.is_terminal():
                        ended.seen = True
                        for event in await asyncio.to_thread(_final_events, job, ask):
                            yield event
                        return
                    progress = job.progress
                    preview = progress.preview if progress is not None else None
                    if progress is not None and preview is not None:
                        key = (progress.current_image, preview.step)
                        if key not in sent and len(sent) < ask.answer.partial_images:
                            yield _partial(ask, preview, len(sent), size)
                            sent.add(key)
                    try:
                        await asyncio.wait_for(changed.wait(), self._limits.heartbeat_s)
                    except TimeoutError:
                        yield KEEP_ALIVE

    async def _cancel_unless(self, job_id: str, ended: _Ended) -> None:
        """Cancel the job unless its end was seen: nobody is waiting for it any more."""
        if ended.seen:
            return
        with suppress(AlreadyTerminal, NotFound):
            # Shielded: this runs while the request's task may itself be cancelled.
            await asyncio.shield(self._offload(self._engine.cancel, job_id))


def _partial(ask: OpenAIRequest, preview: Preview, index: int, size: str) -> bytes:
    created = int(time.time())
    name = f"{ask.events}.partial_image"
    body = answers.partial_event(
        ask.events, preview, index=index, answer=ask.answer, size=size, created=created
    )
    return answers.sse(name, body)


def _final_events(job: Job, ask: OpenAIRequest) -> list[bytes]:
    if job.status is not JobStatus.COMPLETE or job.result is None:
        return [answers.sse("error", job_error_body(job)[1])]
    created = int(time.time())
    name = f"{ask.events}.completed"
    return [
        answers.sse(name, answers.completed_event(ask.events, image, ask.answer, created))
        for image in job.result.images
    ]


def _json(body: dict[str, object]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


class _AnyText(Convertor[str]):
    """A path's rest, newlines included (starlette's `path` is `.*`, which stops at one, so
    such a path would miss these routes and get the native 404 instead of OpenAI's)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_text", _AnyText())


def openai_routes(
    registry: JobSource,
    engine: JobRunner,
    events: JobEvents,
    limits: OpenAILimits,
    models: ModelDirectory | None = None,
) -> list[BaseRoute]:
    """The routes of the OpenAI Images API, to mount beside the native ones; `models` is the
    catalog a request's `model` is looked up in (None: a plugin backend's one model)."""
    images = OpenAIImages(registry, engine, events, limits, models)
    every_method = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return [
        Route(
            f"{PREFIX}/images/generations",
            answers_in_openai_shape(images.generations),
            methods=["POST"],
        ),
        Route(f"{PREFIX}/images/edits", answers_in_openai_shape(images.edits), methods=["POST"]),
        Route(f"{PREFIX}/models", answers_in_openai_shape(images.models), methods=["GET"]),
        Route(
            f"{PREFIX}/models/{{model:any_text}}",
            answers_in_openai_shape(images.model),
            methods=["GET"],
        ),
        # Anything else under the prefix: a 404 in OpenAI's shape, not the native one.
        Route(
            f"{PREFIX}/{{rest:any_text}}",
            answers_in_openai_shape(images.unknown),
            methods=every_method,
        ),
    ]
