"""The job's types: its status machine, its request, progress, result and error."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class JobStatus(str, Enum):
    """Where a job is in its life. Terminal states never change again."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL

    def can_become(self, target: JobStatus) -> bool:
        return target in _TRANSITIONS[self]


_TERMINAL = frozenset({JobStatus.COMPLETE, JobStatus.ERROR, JobStatus.CANCELLED})

# The one transition table: every state change in the program is checked against it.
_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.IN_PROGRESS, JobStatus.ERROR, JobStatus.CANCELLED}),
    JobStatus.IN_PROGRESS: frozenset(
        {JobStatus.IN_PROGRESS, JobStatus.COMPLETE, JobStatus.ERROR, JobStatus.CANCELLED}
    ),
    JobStatus.COMPLETE: frozenset(),
    JobStatus.ERROR: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class Stage(str, Enum):
    """What the current image of a running job is doing."""

    LOADING = "loading"
    DIFFUSION = "diffusion"
    DECODING = "decoding"


class ErrorCode(str, Enum):
    """Codes stored in a failed job."""

    BACKEND_ERROR = "BACKEND_ERROR"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    IO_ERROR = "IO_ERROR"
    TIMEOUT_ERROR = "TIMEOUT_ERROR"
    UNKNOWN_ERROR = "UNKNOWN_ERROR"
    SERVER_RESTARTED = "SERVER_RESTARTED"
    WORKER_LOST = "WORKER_LOST"  # broker mode: the worker running the job stopped responding


SAMPLERS: tuple[str, ...] = (
    "euler_a",
    "euler",
    "heun",
    "dpm2",
    "dpm++2s_a",
    "dpm++2m",
    "dpm++2mv2",
    "lcm",
    "ddim",
    "unipc",
    "er_sde",
    "euler_cfg_pp",
    "euler_a_cfg_pp",
)


# The noise schedules (stable-diffusion.cpp's names) a sampler runs over; "discrete" is the
# model's own.
SCHEDULERS: tuple[str, ...] = ("discrete", "karras", "exponential", "sgm_uniform", "simple")
MAX_LORAS = 8  # LoRAs one request may apply at once
LORA_WEIGHT_LIMIT = 5.0  # a LoRA's weight is within -5..5


@dataclass(frozen=True)
class LoraWeight:
    """One LoRA a request applies, by its name in the server's LoRA folder, at `weight`."""

    name: str
    weight: float


@dataclass(frozen=True)
class InputImage:
    """An image a request brought, as received (already checked by the guarded reader).

    The bytes are kept as they came (the recipe records their SHA-256, a broker worker
    reads them again); the repr leaves them out, so a logged request stays one line.
    """

    data: bytes = field(repr=False)
    width: int  # upright (after the EXIF orientation), as the guarded reader saw it
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


DEFAULT_STRENGTH = 0.75
DEFAULT_MASK_BLUR = 4


@dataclass(frozen=True)
class EditInputs:
    """What makes a job image-to-image (`mask` None) or inpainting: redraw `init`."""

    init: InputImage
    strength: float = DEFAULT_STRENGTH
    mask: InputImage | None = None
    mask_blur: int = DEFAULT_MASK_BLUR

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every field present, every rule already checked."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.5
    seed: int | None = None
    sampler: str = "euler_a"
    count: int = 1
    preview_every: int = 0  # diffusion steps between live previews; 0: no previews
    edit: EditInputs | None = None  # None: text-to-image
    model: str | None = None  # a model id of the server's catalog; None: its default model
    loras: tuple[LoraWeight, ...] = ()
    scheduler: str = "discrete"
    clip_skip: int | None = None  # AUTOMATIC1111's "Clip skip": 1 is the last layer; None: 1

    @property
    def mode(self) -> str:
        return self.edit.mode if self.edit is not None else "txt2img"


@dataclass(frozen=True)
class Preview:
    """A small picture of the current latents (not a VAE decode), encoded as JPEG."""

    jpeg: bytes
    width: int
    height: int
    step: int


@dataclass(frozen=True)
class Progress:
    """A running job's progress; steps count within the current stage of the current image."""

    stage: Stage
    current_step: int
    total_steps: int
    percentage: float
    current_image: int
    total_images: int
    eta_ms: int | None = None
    preview: Preview | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """One finished image, encoded once as PNG."""

    png: bytes
    seed: int
    width: int
    height: int


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds spent in each stage, summed over a job's images."""

    loading_ms: int = 0
    diffusion_ms: int = 0
    decoding_ms: int = 0
    encoding_ms: int = 0


@dataclass(frozen=True)
class Result:
    images: tuple[GeneratedImage, ...]
    time_taken_ms: int
    format: str = "png"
    timings: StageTimings | None = None


@dataclass(frozen=True)
class JobError:
    message: str
    code: ErrorCode


@dataclass(frozen=True)
class Job:
    """A snapshot of one job. Never mutated: the registry replaces it on every change."""

    id: str
    request: GenerationRequest
    status: JobStatus
    created_at: int
    updated_at: int
    started_at: int | None = None
    progress: Progress | None = None
    result: Result | None = None
    error: JobError | None = None
    version: int = 0  # bumped by every change: the id of a server-sent event


@dataclass(frozen=True)
class JobChanged:
    """What a registry tells its listeners: which job changed, and how.

    `status_changed` says the job moved to another state (so queue positions may have
    moved too); `deleted` says the job is gone (swept after its TTL, or evicted).
    """

    job_id: str
    status_changed: bool = False
    deleted: bool = False


JobListener = Callable[[JobChanged], None]
