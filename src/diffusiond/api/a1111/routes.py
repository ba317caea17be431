"""The AUTOMATIC1111 API under /sdapi/v1: each call becomes ordinary diffusiond jobs.

A txt2img or img2img call runs its `n_iter` iterations as one job each (of `batch_size`
images), one after the other, through the same `JobRunner` as POST /v1/images/generations:
so the jobs are listed, cancellable, persisted and run by broker workers like any other.
One job per iteration is what lets `/skip` drop the running iteration and go on with the
next, as A1111 does. The caller waits: for a free worker while the server is busy (woken by
job changes, up to `wait_limit_s`, then a 503 with Retry-After), then for each job's end;
a caller that hangs up has its running job cancelled and no further one started.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from diffusiond.api.a1111.names import (
    PREFIX,
    Checkpoint,
    catalog_checkpoint,
    map_checkpoint,
    samplers_available,
    schedulers_available,
)
from diffusiond.api.a1111.parse import Generation, Limits, load_body, parse_generation
from diffusiond.api.a1111.pnginfo import png_info_body
from diffusiond.api.a1111.shapes import (
    Running,
    checkpoint_body,
    generation_body,
    idle_progress,
    progress_body,
    sampler_body,
    scheduler_body,
)
from diffusiond.api.a1111.transport import (
    JobFailed,
    answer,
    domain_error,
    first_of,
    http_error,
    internal_error,
    watch_hang_up,
)
from diffusiond.api.events import JobEvents
from diffusiond.api.ports import (
    JobRunner,
    JobSource,
    LoraPort,
    ModelDirectory,
    Offload,
    check_for_model,
)
from diffusiond.api.request_body import read_body
from diffusiond.errors import AlreadyTerminal, DiffusiondError, InvalidRequest, NotFound, ServerBusy
from diffusiond.jobs.models import (
    SAMPLERS,
    SCHEDULERS,
    GenerationRequest,
    Job,
    JobStatus,
    LoraWeight,
)

WAIT_LIMIT_S = 600  # how long a call waits for a free worker before a 503
SMALL_BODY_BYTES = 64 * 1024  # /options
LIVE_PREVIEW_EVERY = 1  # diffusion steps between the previews /progress shows
_ADMISSION = "a1111:admission"  # a waiter key: woken by every job's change of status


def job_request(generation: Generation, iteration: int) -> GenerationRequest:
    """The diffusiond job of one iteration of an A1111 call."""
    return GenerationRequest(
        prompt=generation.prompt,
        negative_prompt=generation.negative_prompt,
        width=generation.width,
        height=generation.height,
        steps=generation.steps,
        cfg_scale=generation.cfg_scale,
        seed=generation.seed_of(iteration),
        sampler=generation.sampler,
        count=generation.batch_size,
        preview_every=LIVE_PREVIEW_EVERY,
        edit=generation.edit,
        model=generation.checkpoint.model_id,
        loras=tuple(LoraWeight(name, weight) for name, weight in generation.loras),
        scheduler=generation.scheduler,
        clip_skip=generation.clip_skip,
    )


def builtin_checkpoint(model: str) -> Checkpoint:
    """The one checkpoint a server with a single model lists: its path's name (or the
    built-in model's), with a hash of that name standing in for the file's."""
    name = Path(model).name or model
    digest = hashlib.sha256(model.encode()).hexdigest()
    return Checkpoint(
        title=f"{name} [{digest[:10]}]",
        model_name=Path(name).stem or name,
        hash=digest[:10],
        sha256=digest,
        filename=model,
        model_id=None,
    )


class A1111Api:
    """The endpoints of /sdapi/v1 over the same registry, engine and job events as the
    native API."""

    def __init__(
        self,
        registry: JobSource,
        engine: JobRunner,
        events: JobEvents,
        *,
        max_batch: int,
        max_pixels: int,
        max_body_bytes: int,
        wait_limit_s: float = WAIT_LIMIT_S,
        loras: LoraPort | None = None,
        models: ModelDirectory | None = None,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._events = events
        self._max_batch = max_batch
        self._max_pixels = max_pixels
        self._max_body_bytes = max_body_bytes
        self._wait_limit_s = wait_limit_s
        self._loras = loras
        self._models = models
        self._offload = Offload(registry, engine)
        self._calls: list[Running] = []  # in arrival order
        self._default: Checkpoint | None = None  # POST /options sd_model_checkpoint

    # -- the model catalog -----------------------------------------------------------------

    async def _checkpoints(self) -> list[Checkpoint]:
        if self._models is None:  # a plugin backend: its one model
            info = await self._offload(self._engine.info)
            return [builtin_checkpoint(info.model)]
        directory = self._models
        entries = await asyncio.to_thread(directory.entries)  # rescans the models dir
        default_id = directory.default_id
        entries.sort(key=lambda entry: entry.id != default_id)  # the default first
        return [catalog_checkpoint(entry, default_id) for entry in entries]

    async def _limits(self) -> Limits:
        checkpoints = await self._checkpoints()
        default = self._default if self._default in checkpoints else checkpoints[0]
        return Limits(
            max_batch=self._max_batch,
            max_pixels=self._max_pixels,
            samplers=SAMPLERS,
            schedulers=SCHEDULERS,
            checkpoints=checkpoints,
            default_checkpoint=default,
        )

    # -- txt2img and img2img ---------------------------------------------------------------

    async def txt2img(self, request: Request) -> Response:
        return await self._generate(request, "txt2img")

    async def img2img(self, request: Request) -> Response:
        return await self._generate(request, "img2img")

    async def _generate(self, request: Request, kind: str) -> Response:
        body = await read_body(request, self._max_body_bytes)
        limits = await self._limits()
        parse = functools.partial(parse_generation, kind=kind, limits=limits)
        # Images take milliseconds to check: off the event loop, like the native POST.
        generation = await asyncio.to_thread(lambda: parse(load_body(body)))
        if generation.loras and self._loras is not None:  # the <lora:...> tags: as the native
            wanted = [LoraWeight(name, weight) for name, weight in generation.loras]
            await asyncio.to_thread(self._loras.check, generation.checkpoint.model_id, wanted)
        await asyncio.to_thread(check_for_model, self._models, job_request(generation, 0))
        running = Running(generation, started_s=time.monotonic())
        watcher = asyncio.ensure_future(watch_hang_up(request.receive, running.hang_up))
        self._calls.append(running)
        try:
            await self._run(running)
        except BaseException:  # a failed wait, the server shutting down: nobody will read it
            if running.job_id is not None:
                await asyncio.shield(self._cancel(running.job_id))
            raise
        finally:
            watcher.cancel()
            self._calls.remove(running)
        if running.hung_up:
            return Response(status_code=499)  # nobody reads it
        return answer(await asyncio.to_thread(generation_body, running))

    async def _run(self, running: Running) -> None:
        generation = running.generation
        for iteration in range(generation.n_iter):
            if running.stop.is_set():
                return
            running.iteration, running.skipped, running.job_id = iteration, False, None
            job = await self._admit(job_request(generation, iteration), running.stop)
            if job is None:
                return
            running.job_id = job.id
            running.job_ids.append(job.id)
            job = await self._until_terminal(job.id, running.stop)
            if not job.status.is_terminal():  # hung up, or interrupted as it was admitted
                await self._cancel(job.id)
                return
            if job.status is JobStatus.ERROR:
                message = job.error.message if job.error else "the job failed"
                raise JobFailed(f"job {job.id} failed: {message}")
            if job.status is JobStatus.COMPLETE:
                running.finished.append(job)
            elif not running.skipped:  # cancelled by someone else: as an interrupt
                running.interrupted = True
                return

    async def _admit(self, request: GenerationRequest, stop: asyncio.Event) -> Job | None:
        """The submitted job once a worker (or queue place) is free; None if the call was
        stopped first (hung up, interrupted); a 503 after `wait_limit_s` seconds of waiting.

        A job's change of status wakes the wait. A slot is given back a moment after its
        job's last change, though (a broker's worker ends its queue entry after recording
        the result), so a refusal in that moment would wait for a change that never comes:
        the wait also ends after the Retry-After the engine answered with (1 to 60 s).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_limit_s
        with self._events.subscribe(_ADMISSION) as changed:
            while True:
                changed.clear()
                try:
                    return await self._offload(self._engine.submit, request)
                except ServerBusy as busy:
                    left = deadline - loop.time()
                    if left <= 0 or self._events.closed:
                        raise ServerBusy(
                            f"no worker came free in {self._wait_limit_s:g} s: {busy.message}",
                            retry_after_s=busy.retry_after_s,
                        ) from None
                    recheck_s = min(left, max(1, busy.retry_after_s))
                await first_of(changed, stop, timeout=recheck_s)
                if stop.is_set():
                    return None

    async def _until_terminal(self, job_id: str, stop: asyncio.Event) -> Job:
        """The job once terminal, or as it is when the call is stopped or the server closes."""
        with self._events.subscribe(job_id) as changed:
            while True:
                changed.clear()
                job = await self._offload(self._registry.get, job_id)
                if job.status.is_terminal() or stop.is_set() or self._events.closed:
                    return job
                await first_of(changed, stop)

    async def _cancel(self, job_id: str) -> None:
        with suppress(AlreadyTerminal, NotFound):
            await self._offload(self._engine.cancel, job_id)

    # -- the running call ------------------------------------------------------------------

    def _followed(self) -> Running | None:
        """The call /progress, /interrupt and /skip are about: the oldest with a job."""
        started = [running for running in self._calls if running.job_id is not None]
        return started[0] if started else (self._calls[0] if self._calls else None)

    async def progress(self, request: Request) -> Response:
        running = self._followed()
        if running is None:
            return answer(idle_progress())
        job = None
        if running.job_id is not None:
            with suppress(NotFound):
                job = await self._offload(self._registry.get, running.job_id)
        skip = request.query_params.get("skip_current_image", "false").lower() == "true"
        return answer(progress_body(running, job, time.monotonic(), skip_current_image=skip))

    async def interrupt(self, _request: Request) -> Response:
        running = self._followed()
        if running is not None:
            running.interrupted = True
            running.stop.set()
            if running.job_id is not None:
                await self._cancel(running.job_id)
        return answer({})

    async def skip(self, _request: Request) -> Response:
        running = self._followed()
        if running is not None and running.job_id is not None:
            running.skipped = True
            await self._cancel(running.job_id)
        return answer({})

    # -- lists and settings ----------------------------------------------------------------

    async def sd_models(self, _request: Request) -> Response:
        return answer([checkpoint_body(entry) for entry in await self._checkpoints()])

    async def samplers(self, _request: Request) -> Response:
        return answer([sampler_body(entry) for entry in samplers_available(SAMPLERS)])

    async def schedulers(self, _request: Request) -> Response:
        return answer([scheduler_body(entry) for entry in schedulers_available(SCHEDULERS)])

    async def loras(self, _request: Request) -> Response:
        listing = await asyncio.to_thread(self._loras.listing) if self._loras is not None else []
        names = [entry["name"] for entry in listing]
        return answer([{"name": n, "alias": n, "path": n, "metadata": {}} for n in names])

    async def empty_list(self, _request: Request) -> Response:
        """/upscalers, /sd-vae: nothing of the kind here."""
        return answer([])

    async def scripts(self, _request: Request) -> Response:
        return answer({"txt2img": [], "img2img": []})

    async def options(self, request: Request) -> Response:
        if request.method == "POST":
            data = load_body(await read_body(request, SMALL_BODY_BYTES))
            name = data.get("sd_model_checkpoint")
            if name is not None:
                if not isinstance(name, str):
                    raise InvalidRequest(
                        "sd_model_checkpoint must be a model title",
                        field="sd_model_checkpoint",
                        rule="a title from GET /sdapi/v1/sd-models",
                    )
                self._default = map_checkpoint(name, await self._checkpoints())
            return answer(None)
        default = (await self._limits()).default_checkpoint
        return answer(
            {
                "sd_model_checkpoint": default.title,
                "sd_checkpoint_hash": default.sha256,
                "CLIP_stop_at_last_layers": 1,
                "samples_format": "png",
                "live_previews_enable": True,
                "show_progress_every_n_steps": LIVE_PREVIEW_EVERY,
            }
        )

    async def png_info(self, request: Request) -> Response:
        body = await read_body(request, self._max_body_bytes)
        return answer(await asyncio.to_thread(png_info_body, load_body(body)))


Endpoint = Callable[[Request], Awaitable[Response]]


def a1111_app(api: A1111Api) -> Starlette:
    """The /sdapi/v1 routes as an app of their own, so that every error under the prefix,
    an unknown route's too, comes in A1111's shape."""
    get, post = ["GET"], ["POST"]
    table: list[tuple[str, Endpoint, list[str]]] = [
        ("/txt2img", api.txt2img, post),
        ("/img2img", api.img2img, post),
        ("/progress", api.progress, get),
        ("/interrupt", api.interrupt, post),
        ("/skip", api.skip, post),
        ("/sd-models", api.sd_models, get),
        ("/samplers", api.samplers, get),
        ("/schedulers", api.schedulers, get),
        ("/loras", api.loras, get),
        ("/upscalers", api.empty_list, get),
        ("/sd-vae", api.empty_list, get),
        ("/scripts", api.scripts, get),
        ("/options", api.options, ["GET", "POST"]),
        ("/png-info", api.png_info, post),
    ]
    return Starlette(
        routes=[Route(path, endpoint, methods=methods) for path, endpoint, methods in table],
        exception_handlers={
            DiffusiondError: domain_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )


def a1111_mount(
    registry: JobSource,
    engine: JobRunner,
    events: JobEvents,
    *,
    max_batch: int,
    max_pixels: int,
    max_body_bytes: int,
    models: ModelDirectory | None = None,
    loras: LoraPort | None = None,
) -> Mount:
    """/sdapi/v1 for the app of api/app.py, with its limits; `sd-models` lists `models`,
    `loras` the LoRA folder (and checks the prompt's `<lora:...>` tags)."""
    api = A1111Api(
        registry,
        engine,
        events,
        max_batch=max_batch,
        max_pixels=max_pixels,
        max_body_bytes=max_body_bytes,
        models=models,
        loras=loras,
    )
    return Mount(PREFIX, app=a1111_app(api))
