"""What the sync and async clients share: requests to build, answers to read, no I/O."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from diffusiond.client import errors
from diffusiond.client.inputs import ImageInput, input_base64
from diffusiond.client.models import Generation, Progress

DEFAULT_URL = "http://127.0.0.1:8081"
GENERATIONS = "/v1/images/generations"
DEFAULT_POLL_INTERVAL_S = 0.5

ProgressCallback = Callable[[Progress], object]

_ERRORS: dict[str, type[errors.DiffusiondClientError]] = {
    "INVALID_REQUEST": errors.InvalidRequestError,
    "PAYLOAD_TOO_LARGE": errors.InvalidRequestError,
    "NOT_FOUND": errors.NotFoundError,
    "ALREADY_TERMINAL": errors.AlreadyTerminalError,
    "SERVER_NOT_READY": errors.ServerNotReadyError,
    "UNAUTHORIZED": errors.UnauthorizedError,
}


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header for `api_key`, else DIFFUSIOND_API_KEY, else none."""
    key = api_key or os.environ.get("DIFFUSIOND_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def resolve_url(url: str | None) -> str:
    """The server URL: the argument, else DIFFUSIOND_URL, else http://127.0.0.1:8081."""
    return (url or os.environ.get("DIFFUSIOND_URL") or DEFAULT_URL).rstrip("/")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None  # None: the server's default (512), or the init image's size
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.5
    seed: int | None = None
    sampler: str = "euler_a"
    count: int = 1
    preview_every: int | None = None
    init_image: ImageInput | None = None  # image-to-image; with mask_image, inpainting
    mask_image: ImageInput | None = None
    strength: float | None = None
    mask_blur: int | None = None
    model: str | None = None  # a model id of GET /v1/models; None: the server's default
    # (name, weight) pairs or {"name", "weight"} mappings of GET /v1/loras
    loras: Sequence[tuple[str, float] | Mapping[str, Any]] | None = None
    scheduler: str | None = None
    clip_skip: int | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": self.prompt,
            "steps": self.steps,
            "cfgScale": self.cfg_scale,
            "sampler": self.sampler,
            "count": self.count,
            "seed": self.seed,
        }
        optional = {
            "width": self.width,
            "height": self.height,
            "negativePrompt": self.negative_prompt,
            "previewEvery": self.preview_every,
            "strength": self.strength,
            "maskBlur": self.mask_blur,
            "model": self.model,
            "scheduler": self.scheduler,
            "clipSkip": self.clip_skip,
        }
        body |= {name: value for name, value in optional.items() if value is not None}
        if self.loras:
            body["loras"] = [lora_wire(lora) for lora in self.loras]
        if self.init_image is not None:
            body["initImage"] = input_base64(self.init_image)
        if self.mask_image is not None:
            body["maskImage"] = input_base64(self.mask_image)
        return body


def lora_wire(lora: tuple[str, float] | Mapping[str, Any]) -> dict[str, Any]:
    """One LoRA as the API takes it, from a (name, weight) pair or a mapping."""
    if isinstance(lora, Mapping):
        return {"name": lora["name"], "weight": lora.get("weight", 1.0)}
    name, weight = lora
    return {"name": name, "weight": weight}


class EventReader:
    """Server-sent events from lines: feed each line, get a snapshot per `data` event."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Generation | None:
        if line == "":  # the end of one event
            data, self._data = self._data, []
            return Generation.from_wire(json.loads("\n".join(data))) if data else None
        if line.startswith(":"):
            return None  # a comment: the heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self.last_id = value
        return None


def events_headers(last_event_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


def list_params(status: str | Iterable[str] | None, limit: int | None) -> dict[str, str]:
    """The list endpoint's query: `status` one name or several, `limit` a count."""
    params: dict[str, str] = {}
    if status is not None:
        params["status"] = status if isinstance(status, str) else ",".join(status)
    if limit is not None:
        params["limit"] = str(limit)
    return params


def connection_error(url: str, exc: Exception) -> errors.ConnectionError:
    return errors.ConnectionError(
        f"no diffusiond server answered at {url} ({type(exc).__name__}); start one with "
        "`diffusiond serve` or point DIFFUSIOND_URL / --server at it",
        code="CONNECTION_ERROR",
    )


def checked(response: httpx.Response) -> Any:
    """The JSON body of a successful answer, or the typed error the answer stands for."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "", f"HTTP {response.status_code}: {response.text[:200]}"
    kwargs: dict[str, Any] = {
        "code": code,
        "status": response.status_code,
        "details": error.get("details") if code else None,
        "suggestion": error.get("suggestion") if code else None,
    }
    if code == "SERVER_BUSY":
        raise errors.ServerBusyError(
            message, retry_after=_retry_after(response.headers.get("retry-after")), **kwargs
        )
    raise _ERRORS.get(code, errors.ServerError)(message, **kwargs)


def _retry_after(header: str | None) -> float:
    try:
        value = float(header) if header is not None else 1.0
    except ValueError:
        return 1.0
    return value if math.isfinite(value) and value >= 0 else 1.0


def outcome(generation: Generation) -> Generation:
    """A terminal generation as a result: complete returns it, others raise their error."""
    if generation.status == "error":
        raise errors.GenerationFailedError(
            generation.error_message or "the generation failed",
            code=generation.error_code or "UNKNOWN_ERROR",
        )
    if generation.status == "cancelled":
        raise errors.GenerationCancelledError(
            f"generation {generation.id} was cancelled", code="CANCELLED"
        )
    return generation


class Deadline:
    """Seconds left until an optional deadline on the monotonic clock."""

    def __init__(self, seconds: float | None) -> None:
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self._end is None else self._end - time.monotonic()

    def passed(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def cap(self, seconds: float) -> float:
        left = self.remaining()
        return seconds if left is None else max(0.0, min(seconds, left))


class ProgressRelay:
    """Calls the caller's callback once per change of progress."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._last: Progress | None = None

    def see(self, generation: Generation) -> None:
        progress = generation.progress
        if self._callback is None or progress is None or progress == self._last:
            return
        self._last = progress
        self._callback(progress)


def poll_interval_s(health: Mapping[str, Any]) -> float:
    interval = health.get("pollIntervalMs")
    if isinstance(interval, int | float) and interval > 0:
        return float(interval) / 1000
    return DEFAULT_POLL_INTERVAL_S


def timeout_error(job_id: str, timeout: float) -> errors.GenerationTimeoutError:
    return errors.GenerationTimeoutError(
        f"generation {job_id} did not finish within {timeout:g} s; it was cancelled",
        code="TIMEOUT",
    )
