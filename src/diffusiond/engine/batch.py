"""The batch loop: seeds, overall progress arithmetic, and which image failed.

Pure logic over the backend protocol: no threads, no registry, no torch.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable, Mapping

from PIL.Image import Image

from diffusiond import __version__
from diffusiond.backends.base import (
    Backend,
    CancelCheck,
    DeviceOutOfMemory,
    GenerationCancelled,
    ImageSpec,
)
from diffusiond.imaging import recipe_text
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    JobError,
    Preview,
    Progress,
    Stage,
    StageTimings,
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
Encoder = Callable[[Image, Mapping[str, str]], bytes]  # a picture and its text chunks
PreviewEncoder = Callable[[Image], bytes]
Recipe = Callable[[ImageSpec], Mapping[str, str]]  # the text chunks for one image


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


def image_recipe(
    spec: ImageSpec, model: str, architecture: str = "unknown", *, model_hash: str | None = None
) -> dict[str, str]:
    """The PNG text chunks that let one image be made again: its parameters, model (id, and
    the short hash of its weights where known) and the model's family (`architecture`, as
    /health says it), and for an edit its mode, strength, mask blur and the SHA-256 of the
    images it was given."""
    recipe: dict[str, object] = {
        "prompt": spec.prompt,
        "negativePrompt": spec.negative_prompt,
        "width": spec.width,
        "height": spec.height,
        "steps": spec.steps,
        "cfgScale": spec.cfg_scale,
        "seed": spec.seed,
        "sampler": spec.sampler,
        "scheduler": spec.scheduler,
        "model": model,
        "architecture": architecture,
        **({"modelHash": model_hash} if model_hash is not None else {}),
        "version": __version__,
        "mode": "txt2img",
    }
    if spec.clip_skip is not None:
        recipe["clipSkip"] = spec.clip_skip
    if spec.loras:
        recipe["loras"] = [{"name": lora.name, "weight": lora.weight} for lora in spec.loras]
    edit = spec.edit
    if edit is not None:
        recipe |= {
            "mode": edit.mode,
            "strength": edit.strength,
            "initImageSha256": edit.init.sha256,
        }
        if edit.mask is not None:
            recipe |= {"maskBlur": edit.mask_blur, "maskImageSha256": edit.mask.sha256}
    return recipe_text(recipe)


class _StageClock:
    """Adds up the time spent in each stage, from the stage changes a backend reports."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._spent = dict.fromkeys(("loading", "diffusion", "decoding", "encoding"), 0.0)
        self._stage: str | None = None
        self._since = 0.0

    def enter(self, stage: str) -> None:
        if stage == self._stage:
            return
        now = self._clock()
        if self._stage is not None:
            self._spent[self._stage] += now - self._since
        self._stage, self._since = stage, now

    def stop(self) -> None:
        self.enter("")  # closes the current stage; "" is never reported
        self._stage = None

    def timings(self) -> StageTimings:
        ms = {name: round(seconds * 1000) for name, seconds in self._spent.items()}
        return StageTimings(ms["loading"], ms["diffusion"], ms["decoding"], ms["encoding"])


def run_batch(
    backend: Backend,
    request: GenerationRequest,
    *,
    report: ProgressSink,
    should_cancel: CancelCheck,
    encode: Encoder,
    recipe: Recipe = lambda _spec: {},
    encode_preview: PreviewEncoder | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[tuple[GeneratedImage, ...], StageTimings]:
    """Draw `request.count` images one after another; all of them or an exception.

    Returns the images and the time spent in each stage. Raises `GenerationCancelled` when
    cancelled, `BatchFailed` when an image fails.
    """
    count = request.count
    images: list[GeneratedImage] = []
    stages = _StageClock(clock)
    last: list[Progress] = []  # the latest progress reported, for previews to extend
    for index, seed in enumerate(resolve_seeds(request.seed, count, rng)):

        def on_stage(stage: Stage, step: int, total: int, done: int = index) -> None:
            stages.enter(stage.value)
            progress = Progress(
                stage=stage,
                current_step=step,
                total_steps=total,
                percentage=overall_percentage(done, count, image_fraction(stage, step, total)),
                current_image=done + 1,
                total_images=count,
            )
            last[:] = [progress]
            report(progress)

        def on_preview(step: int, picture: Image) -> None:
            if encode_preview is None or not last:
                return
            preview = Preview(encode_preview(picture), picture.width, picture.height, step)
            report(dataclasses.replace(last[0], preview=preview))

        spec = ImageSpec(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            cfg_scale=request.cfg_scale,
            seed=seed,
            sampler=request.sampler,
            preview_every=request.preview_every,
            edit=request.edit,
            model=request.model,
            loras=request.loras,
            scheduler=request.scheduler,
            clip_skip=request.clip_skip,
        )
        try:
            if should_cancel():
                raise GenerationCancelled
            if request.preview_every and encode_preview is not None:
                picture = backend.generate(spec, on_stage, should_cancel, on_preview)
            else:
                picture = backend.generate(spec, on_stage, should_cancel)
            _refuse_blank(picture)
            stages.enter("encoding")
            png = encode(picture, recipe(spec))
            stages.stop()
        except GenerationCancelled:
            raise
        except Exception as exc:
            raise BatchFailed(index + 1, count, exc) from exc
        images.append(
            GeneratedImage(png=png, seed=seed, width=request.width, height=request.height)
        )
    return tuple(images), stages.timings()
