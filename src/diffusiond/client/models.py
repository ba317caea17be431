"""What the client hands back: typed, immutable views of the server's JSON."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

from diffusiond.client.errors import UnsafeAnswerError

TERMINAL_STATUSES = frozenset({"complete", "error", "cancelled"})
# The largest image `to_pil` decodes: 128 Mpx, far past any size a server is set to draw.
MAX_RESULT_PIXELS = 128 * 1024 * 1024
# What a generation id may hold: it names saved files and goes into URL paths, so nothing
# that could climb out of a folder or a path segment ("/", "..", "%", NUL, ...).
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def safe_id(value: object) -> str:
    """`value` if it is a generation id safe to use in a file name and a URL path;
    UnsafeAnswerError otherwise."""
    if not isinstance(value, str) or _SAFE_ID.fullmatch(value) is None:
        raise UnsafeAnswerError(
            f"the server answered the generation id {value!r}, which is not 1-128 of "
            "A-Z a-z 0-9 _ -; refusing to use it"
        )
    return value


def _seed(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnsafeAnswerError(f"the server answered the seed {value!r}, which is not an integer")
    return value


@dataclass(frozen=True)
class Progress:
    """A running generation's progress, as the server reports it."""

    stage: str
    current_step: int
    total_steps: int
    percentage: float
    current_image: int
    total_images: int
    eta_ms: int | None = None
    preview_jpeg: bytes | None = None  # a small picture of the work, when asked for

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Progress:
        preview = body.get("preview")
        return cls(
            stage=body["stage"],
            current_step=body["currentStep"],
            total_steps=body["totalSteps"],
            percentage=body["percentage"],
            current_image=body["currentImage"],
            total_images=body["totalImages"],
            eta_ms=body.get("etaMs"),
            preview_jpeg=base64.b64decode(preview["image"]) if preview else None,
        )


@dataclass(frozen=True)
class GeneratedImage:
    """One finished PNG and the seed that reproduces it."""

    png: bytes
    seed: int
    width: int
    height: int

    def save(self, path: str | Path) -> Path:
        """Write the PNG to `path` and return the path."""
        target = Path(path)
        target.write_bytes(self.png)
        return target

    def to_pil(self) -> Image:
        """The image as a Pillow image, decoded from the PNG bytes by diffusiond's guarded
        reader (ValueError, not a traceback, for a bomb or a broken file)."""
        from diffusiond.images_in import open_checked

        with open_checked(self.png, max_pixels=MAX_RESULT_PIXELS) as picture:
            picture.load()
            return picture.copy()

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> GeneratedImage:
        return cls(
            png=base64.b64decode(body["image"]),
            seed=_seed(body["seed"]),
            width=body["width"],
            height=body["height"],
        )


@dataclass(frozen=True)
class Generation:
    """A snapshot of one generation job on the server."""

    id: str
    status: str
    created_at: int
    updated_at: int | None = None
    progress: Progress | None = None
    images: tuple[GeneratedImage, ...] = ()
    time_taken_ms: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    queue_position: int | None = None  # while pending in a bounded queue: 1 runs next
    timings: dict[str, int] | None = None  # ms per stage of a complete job

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Generation:
        result = body.get("result") or {}
        error = body.get("error") or {}
        progress = body.get("progress")
        return cls(
            id=safe_id(body["id"]),
            status=body["status"],
            created_at=body["createdAt"],
            updated_at=body.get("updatedAt"),
            progress=Progress.from_wire(progress) if progress else None,
            images=tuple(GeneratedImage.from_wire(entry) for entry in result.get("images", ())),
            time_taken_ms=result.get("timeTaken"),
            error_code=error.get("code"),
            error_message=error.get("message"),
            queue_position=body.get("queuePosition"),
            timings=result.get("timings"),
        )


@dataclass(frozen=True)
class Health:
    """The server's /health answer."""

    status: str
    busy: bool
    poll_interval_ms: int
    model: str | None
    version: str | None
    raw: dict[str, Any]

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Health:
        return cls(
            status=body["status"],
            busy=body["busy"],
            poll_interval_ms=body.get("pollIntervalMs", 500),
            model=body.get("model"),
            version=body.get("version"),
            raw=body,
        )


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA of the server's GET /v1/loras: its name (for `loras=`) and architecture."""

    name: str
    architecture: str

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> LoraInfo:
        return cls(name=str(body["name"]), architecture=str(body["architecture"]))

    @classmethod
    def listing(cls, body: dict[str, Any]) -> list[LoraInfo]:
        return [cls.from_wire(entry) for entry in body["loras"]]


@dataclass(frozen=True)
class ModelInfo:
    """One model of the server's GET /v1/models: `id` is what `model=` takes."""

    id: str
    architecture: str
    format: str
    loaded: bool
    default: bool
    path: str | None = None  # only where the request carried the API key

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> ModelInfo:
        return cls(
            id=str(body["id"]),
            architecture=str(body.get("architecture", "unknown")),
            format=str(body.get("format", "unknown")),
            loaded=bool(body.get("loaded", False)),
            default=bool(body.get("default", False)),
            path=body.get("path"),
        )


@dataclass(frozen=True)
class Samplers:
    """The server's GET /v1/samplers answer: the names a request may give."""

    samplers: tuple[str, ...]
    schedulers: tuple[str, ...]

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Samplers:
        return cls(samplers=tuple(body["samplers"]), schedulers=tuple(body["schedulers"]))
