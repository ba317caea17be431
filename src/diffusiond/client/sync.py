"""`Client`: the blocking Python client of a diffusiond server."""

from __future__ import annotations

import builtins
import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


class Client:
    """Talks to a diffusiond server over its HTTP API.

    `url` defaults to DIFFUSIOND_URL, else http://127.0.0.1:8081. With `retry_busy=S`, a
    start that finds the server busy is retried after the server's Retry-After for up to S
    seconds before `ServerBusyError` is raised.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        retry_busy: float | None = None,
        request_timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = proto.resolve_url(url)
        self._retry_busy = retry_busy
        self._http = http or httpx.Client(
            base_url=self.url, timeout=request_timeout, headers=proto.auth_headers(api_key)
        )
        self._poll_interval_s: float | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def generate(
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
        """Start a generation, wait for it, and return its images.

        `init_image` (a path, bytes or a PIL image) makes it image-to-image at `strength`
        (0..1, default 0.75); with `mask_image` too, inpainting: white redraws, black is
        kept exactly, the edge feathered over `mask_blur` pixels (default 4). Without
        `width`/`height` the output takes the init image's size (else 512x512).

        `model` is a model id of `models()` (default: the server's default model); `loras`
        are (name, weight) pairs of `loras()`; `scheduler` is the noise schedule
        ("discrete", "karras", ...); `clip_skip` AUTOMATIC1111's "Clip skip" (1..12).

        Calls `on_progress(progress)` on each change. If `timeout` seconds pass, or the
        caller is interrupted (KeyboardInterrupt), the job is cancelled on the server first.
        Raises `GenerationFailedError` or `GenerationCancelledError` if it does not complete.
        """
        generation = self.start(
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
        return list(self.wait(generation.id, on_progress=on_progress, timeout=timeout).images)

    def start(self, prompt: str, **params: Any) -> Generation:
        """Start a generation and return it (pending) without waiting."""
        body = proto.GenerationParams(prompt, **params).to_wire()
        deadline = proto.Deadline(self._retry_busy)
        while True:
            try:
                return Generation.from_wire(self._call("POST", proto.GENERATIONS, json=body))
            except ServerBusyError as busy:
                if self._retry_busy is None or deadline.passed():
                    raise
                time.sleep(deadline.cap(busy.retry_after))

    def get(self, generation_id: str) -> Generation:
        return Generation.from_wire(self._call("GET", f"{proto.GENERATIONS}/{generation_id}"))

    def cancel(self, generation_id: str) -> Generation:
        body = self._call("DELETE", f"{proto.GENERATIONS}/{generation_id}")
        return Generation.from_wire({"createdAt": 0, **body})

    def list(
        self, *, status: str | Iterable[str] | None = None, limit: int | None = None
    ) -> list[Generation]:
        """Generations newest first; only those in `status` (one or several), at most `limit`."""
        body = self._call("GET", proto.GENERATIONS, params=proto.list_params(status, limit))
        return [Generation.from_wire(entry) for entry in body["generations"]]

    def health(self) -> Health:
        return Health.from_wire(self._call("GET", "/health"))

    def loras(self) -> builtins.list[LoraInfo]:
        """The LoRAs the server can apply (GET /v1/loras), by name."""
        return LoraInfo.listing(self._call("GET", "/v1/loras"))

    def models(self) -> builtins.list[ModelInfo]:
        """The models the server can draw with (GET /v1/models); `model=` takes an id."""
        body = self._call("GET", "/v1/models")
        return [ModelInfo.from_wire(item) for item in body["models"]]

    def samplers(self) -> Samplers:
        """The sampler and scheduler names the server takes (GET /v1/samplers)."""
        return Samplers.from_wire(self._call("GET", "/v1/samplers"))

    def image_png(self, generation_id: str, index: int = 0) -> bytes:
        """The PNG bytes of image `index` (0-based) of a complete generation."""
        path = f"{proto.GENERATIONS}/{generation_id}/images/{index}"
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise proto.connection_error(self.url, exc) from None
        if response.status_code != 200:
            proto.checked(response)
        return response.content

    def events(
        self, generation_id: str, *, last_event_id: str | None = None
    ) -> Iterator[Generation]:
        """The generation's states as the server pushes them (server-sent events), ending
        with its terminal state."""
        path = f"{proto.GENERATIONS}/{generation_id}/events"
        reader = proto.EventReader()
        headers = proto.events_headers(last_event_id)
        try:
            with self._http.stream("GET", path, headers=headers, timeout=None) as response:
                if response.status_code != 200:
                    response.read()
                    proto.checked(response)
                for line in response.iter_lines():
                    generation = reader.feed(line)
                    if generation is not None:
                        yield generation
        except httpx.TransportError as exc:
            raise proto.connection_error(self.url, exc) from None

    def wait(
        self,
        generation_id: str,
        *,
        on_progress: proto.ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Poll until the generation ends; return it if complete, else raise its error."""
        relay = proto.ProgressRelay(on_progress)
        deadline = proto.Deadline(timeout)
        try:
            interval = self._advised_interval()
            while True:
                generation = self.get(generation_id)
                relay.see(generation)
                if generation.is_terminal:
                    return proto.outcome(generation)
                if deadline.passed():
                    assert timeout is not None
                    self._cancel_quietly(generation_id)
                    raise proto.timeout_error(generation_id, timeout)
                time.sleep(deadline.cap(interval))
        except KeyboardInterrupt:
            self._cancel_quietly(generation_id)
            raise

    def _advised_interval(self) -> float:
        if self._poll_interval_s is None:
            self._poll_interval_s = proto.poll_interval_s(self._call("GET", "/health"))
        return self._poll_interval_s

    def _cancel_quietly(self, generation_id: str) -> None:
        # A fresh connection: an interrupt may have left the pooled one mid-request.
        with (
            httpx.Client(base_url=self.url, headers=self._http.headers, timeout=10) as fresh,
            contextlib.suppress(httpx.HTTPError),
        ):
            fresh.delete(f"{proto.GENERATIONS}/{generation_id}")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise proto.connection_error(self.url, exc) from None
        return proto.checked(response)
