"""The protocol between the engine and a model backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from diffusiond.jobs.models import EditInputs, LoraWeight, Stage

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class ImageSpec:
    """Everything a backend needs to draw one image; `seed` is always concrete."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: str
    preview_every: int = 0  # call `on_preview` every this many diffusion steps; 0: never
    edit: EditInputs | None = None  # image-to-image or inpainting; None: text-to-image
    model: str | None = None  # the catalog's model id; None: the default model
    loras: tuple[LoraWeight, ...] = ()
    scheduler: str = "discrete"
    clip_skip: int | None = None


# stage, current step within the stage, total steps of the stage
StageCallback = Callable[[Stage, int, int], None]
CancelCheck = Callable[[], bool]
# the diffusion step just done, a small picture of the current latents (<= 128 px)
PreviewCallback = Callable[[int, "Image"], None]


@dataclass(frozen=True)
class BackendInfo:
    """What /health reports: the default model (name, model, device, dtype, architecture,
    offload) and the ids of the models loaded now, the most recently used last."""

    name: str
    model: str
    device: str
    dtype: str
    architecture: str = "unknown"  # sd1, sd2, sdxl, or a flow family (families.py)
    models: tuple[str, ...] = ()
    components: tuple[tuple[str, str], ...] = ()  # (role, file name) of split components
    offload: str = "none"  # none, model or sequential: where the weights live (offload.py)


@dataclass(frozen=True)
class ModelLabel:
    """How a PNG's recipe names the model that drew it: its catalog id, short hash and
    architecture."""

    id: str
    hash: str | None = None
    architecture: str = "unknown"


class GenerationCancelled(Exception):
    """Raised inside a generation when its job was cancelled; stops it at the next step."""


class DeviceOutOfMemory(Exception):
    """The device ran out of memory while generating."""


class Backend(Protocol):
    """A loaded model that draws one image at a time.

    `load()` runs once, before any `generate()`. `generate()` reports each stage through
    `on_stage`, calls `should_cancel()` at least once per diffusion step and raises
    `GenerationCancelled` when it answers True, and returns an RGB image. When
    `spec.preview_every` is set, it calls `on_preview(step, picture)` after every that many
    diffusion steps with a small picture of the work in progress.
    """

    def load(self) -> None: ...

    def info(self) -> BackendInfo: ...

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image: ...


@runtime_checkable
class LabelsModels(Protocol):
    """A backend serving several models says which one a request's `model` names."""

    def model_label(self, model: str | None) -> ModelLabel: ...
