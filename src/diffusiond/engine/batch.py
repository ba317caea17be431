"""The batch loop: seeds, overall progress arithmetic, and which image failed.

Pure logic over the backend protocol: no threads, no registry, no torch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from PIL.Image import Image

from diffusiond.backends.base import (
    Backend,
    CancelCheck,
    DeviceOutOfMemory,
    GenerationCancelled,
    ImageSpec,
)
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    JobError,
    Progress,
    Stage,
)

SEED_MODULUS = 2**32

# The share of one image's progress each stage spans. Decoding ends below 1: an image
# counts as done only once it is decoded *and* encoded, which only the loop knows.
_STAGE_SPANS: dict[Stage, tuple[float, float]] = {
    Stage.LOADING: (0.0, 0.05),
    Stage.DIFFUSION: (0.05, 0.90),
    Stage.DECODING: (0.90, 0.99),
}

ProgressSink = Callable[[Progress], None]
Encoder = Callable[[Image], bytes]


def resolve_seeds(seed: int | None, count: int, rng: random.Random | None = None) -> list[int]:
    """seed, seed+1, ... (mod 2**32) when a seed is given, an own random seed per image if not."""
    if seed is not None:
        return [(seed + i) % SEED_MODULUS for i in range(count)]
    source = rng if rng is not None else random.SystemRandom()
    return [source.randrange(SEED_MODULUS) for _ in range(count)]


def image_fraction(stage: Stage, step: int, total: int) -> float:
    """How far one image is, 0..0.99, from its stage and the step within that stage."""
    start, end = _STAGE_SPANS[stage]
    done = min(max(step, 0), total) / total if total > 0 else 0.0
    return start + (end - start) * done


def overall_percentage(images_done: int, count: int, fraction: float) -> float:
    """(imagesDone + fractionOfCurrentImage) / count * 100, rounded to 0.01."""
    return round((images_done + fraction) / count * 100, 2)


class BlankImage(Exception):
    """The backend returned an image of one flat colour (often NaN values turned black)."""


def _refuse_blank(picture: Image) -> None:
    extrema = picture.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    if all(low == high for low, high in bands):
        raise BlankImage(
            "the model produced a blank image (every pixel the same colour); this usually "
            "means NaN values, e.g. from float16 overflow"
        )


# Absolute file paths are for the log, never for a response.
_PATH = re.compile(r"(?<![\w:/])/(?:[^\s/'\"]+/)+[^\s'\"]*")


def scrub_paths(text: str) -> str:
    return _PATH.sub("<path>", text)


class BatchFailed(Exception):
    """Image `index` (1-based) of `count` raised `cause`."""

    def __init__(self, index: int, count: int, cause: Exception) -> None:
        super().__init__(f"image {index} of {count} failed: {cause!r}")
        self.index = index
        self.count = count
        self.cause = cause

    def to_job_error(self) -> JobError:
        detail = scrub_paths(str(self.cause)) or type(self.cause).__name__
        where = f"on image {self.index} of {self.count}" if self.count > 1 else ""
        prefix = f"Generation failed {where}".rstrip()
        return JobError(message=f"{prefix}: {detail}"[:1000], code=classify_error(self.cause))


def classify_error(exc: BaseException) -> ErrorCode:
    """The stored code for an exception raised while generating."""
    if isinstance(exc, DeviceOutOfMemory | MemoryError):
        return ErrorCode.OUT_OF_MEMORY
    if isinstance(exc, TimeoutError):
        return ErrorCode.TIMEOUT_ERROR
    if isinstance(exc, OSError):
        return ErrorCode.IO_ERROR
    if isinstance(exc, Exception):
        return ErrorCode.BACKEND_ERROR
    return ErrorCode.UNKNOWN_ERROR


def run_batch(
    backend: Backend,
    request: GenerationRequest,
    *,
    report: ProgressSink,
    should_cancel: CancelCheck,
    encode: Encoder,
    rng: random.Random | None = None,
) -> tuple[GeneratedImage, ...]:
    """Draw `request.count` images one after another; all of them or an exception.

    Raises `GenerationCancelled` when cancelled, `BatchFailed` when an image fails.
    """
    count = request.count
    images: list[GeneratedImage] = []
    for index, seed in enumerate(resolve_seeds(request.seed, count, rng)):

        def on_stage(stage: Stage, step: int, total: int, done: int = index) -> None:
            report(
                Progress(
                    stage=stage,
                    current_step=step,
                    total_steps=total,
                    percentage=overall_percentage(done, count, image_fraction(stage, step, total)),
                    current_image=done + 1,
                    total_images=count,
                )
            )

        spec = ImageSpec(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            cfg_scale=request.cfg_scale,
            seed=seed,
            sampler=request.sampler,
        )
        try:
            if should_cancel():
                raise GenerationCancelled
            picture = backend.generate(spec, on_stage, should_cancel)
            _refuse_blank(picture)
            png = encode(picture)
        except GenerationCancelled:
            raise
        except Exception as exc:
            raise BatchFailed(index + 1, count, exc) from exc
        images.append(
            GeneratedImage(png=png, seed=seed, width=request.width, height=request.height)
        )
    return tuple(images)
