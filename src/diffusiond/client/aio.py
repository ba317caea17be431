"""`AsyncClient`: the asyncio Python client of a diffusiond server."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from diffusiond.client import _protocol as proto
from diffusiond.client.errors import ServerBusyError
from diffusiond.client.inputs import ImageInput
from diffusiond.client.models import (
    GeneratedImage,
    Generation,
    Health,
    LoraInfo,
    ModelInfo,
    Samplers,
)


class AsyncClient:
    """The asyncio twin of `Client`: the same calls, awaited.

    A task cancelled while it waits cancels the job on the server before the
    cancellation goes on.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        retry_busy: float | None = None,
        request_timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = proto.resolve_url(url)
        self._retry_busy = retry_busy
        self._http = http or httpx.AsyncClient(
            base_url=self.url, timeout=request_timeout, headers=proto.auth_headers(api_key)
        )
        self._poll_interval_s: float | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        cfg_scale: float = 7.5,
        seed: int | None = None,
        sampler: str = "euler_a",
        count: int = 1,
        init_image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
        mask_blur: int | None = None,
        model: str | None = None,
        loras: Sequence[tuple[str, float] | Mapping[str, Any]] | None = None,
        scheduler: str | None = None,
        clip_skip: int | None = None,
        on_progress: proto.ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> list[GeneratedImage]:
        """Start a generation, wait for it, and return its images (see `Client.generate`)."""
        generation = await self.start(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            sampler=sampler,
            count=count,
            init_image=init_image,
            mask_image=mask_image,
            strength=strength,
            mask_blur=mask_blur,
            model=model,
            loras=loras,
            scheduler=scheduler,
            clip_skip=clip_skip,
        )
        done = await self.wait(generation.id, on_progress=on_progress, timeout=timeout)
        return list(done.images)

    async def start(self, prompt: str, **params: Any) -> Generation:
        body = proto.GenerationParams(prompt, **params).to_wire()
        deadline = proto.Deadline(self._retry_busy)
        while True:
            try:
                answer = await self._call("POST", proto.GENERATIONS, json=body)
                return Generation.from_wire(answer)
            except ServerBusyError as busy:
                if self._retry_busy is None or deadline.passed():
                    raise
                await asyncio.sleep(deadline.cap(busy.retry_after))

    async def get(self, generation_id: str) -> Generation:
        body = await self._call("GET", f"{proto.GENERATIONS}/{generation_id}")
        return Generation.from_wire(body)

    async def cancel(self, generation_id: str) -> Generation:
        body = await self._call("DELETE", f"{proto.GENERATIONS}/{generation_id}")
        return Generation.from_wire({"createdAt": 0, **body})

    async def list(
        self, *, status: str | Iterable[str] | None = None, limit: int | None = None
    ) -> list[Generation]:
        """Generations newest first; only those in `status` (one or several), at most `limit`."""
        body = await self._call("GET", proto.GENERATIONS, params=proto.list_params(status, limit))
        return [Generation.from_wire(entry) for entry in body["generations"]]

    async def health(self) -> Health:
        return Health.from_wire(await self._call("GET", "/health"))

    async def loras(self) -> builtins.list[LoraInfo]:
        """The LoRAs the server can apply (GET /v1/loras), by name."""
        return LoraInfo.listing(await self._call("GET", "/v1/loras"))

    async def models(self) -> builtins.list[ModelInfo]:
        """The models the server can draw with (GET /v1/models); `model=` takes an id."""
        body = await self._call("GET", "/v1/models")
        return [ModelInfo.from_wire(item) for item in body["models"]]

    async def samplers(self) -> Samplers:
        """The sampler and scheduler names the server takes (GET /v1/samplers)."""
        return Samplers.from_wire(await self._call("GET", "/v1/samplers"))

    async def image_png(self, generation_id: str, index: int = 0) -> bytes:
        """The PNG bytes of image `index` (0-based) of a complete generation."""
        path = f"{proto.GENERATIONS}/{generation_id}/images/{index}"
        try:
            response = await self._http.get(path)
        except httpx.TransportError as exc:
            raise proto.connection_error(self.url, exc) from None
        if response.status_code != 200:
            proto.checked(response)
        return response.content

    async def events(
        self, generation_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Generation]:
        """The generation's states as the server pushes them (server-sent events), ending
        with its terminal state."""
        path = f"{proto.GENERATIONS}/{generation_id}/events"
        reader = proto.EventReader()
        headers = proto.events_headers(last_event_id)
        try:
            async with self._http.stream("GET", path, headers=headers, timeout=None) as response:
                if response.status_code != 200:
                    await response.aread()
                    proto.checked(response)
                async for line in response.aiter_lines():
                    generation = reader.feed(line)
                    if generation is not None:
                        yield generation
        except httpx.TransportError as exc:
            raise proto.connection_error(self.url, exc) from None

    async def wait(
        self,
        generation_id: str,
        *,
        on_progress: proto.ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> Generation:
        relay = proto.ProgressRelay(on_progress)
        deadline = proto.Deadline(timeout)
        try:
            interval = await self._advised_interval()
            while True:
                generation = await self.get(generation_id)
                relay.see(generation)
                if generation.is_terminal:
                    return proto.outcome(generation)
                if deadline.passed():
                    assert timeout is not None
                    await self._cancel_quietly(generation_id)
                    raise proto.timeout_error(generation_id, timeout)
                await asyncio.sleep(deadline.cap(interval))
        except (asyncio.CancelledError, KeyboardInterrupt):
            await self._cancel_quietly(generation_id)
            raise

    async def _advised_interval(self) -> float:
        if self._poll_interval_s is None:
            self._poll_interval_s = proto.poll_interval_s(await self._call("GET", "/health"))
        return self._poll_interval_s

    async def _cancel_quietly(self, generation_id: str) -> None:
        # A fresh connection: a cancellation may have left the pooled one mid-request.
        async with httpx.AsyncClient(
            base_url=self.url, headers=self._http.headers, timeout=10
        ) as fresh:
            with contextlib.suppress(httpx.HTTPError):
                await fresh.delete(f"{proto.GENERATIONS}/{generation_id}")

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise proto.connection_error(self.url, exc) from None
        return proto.checked(response)
