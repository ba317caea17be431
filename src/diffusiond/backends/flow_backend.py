"""The flow-matching families (FLUX.1, FLUX.2 klein, SD 3.x, Z-Image, Qwen-Image, Chroma) on
their own diffusers pipelines, loaded once from a diffusers folder.

Each family differs in its text encoders, its latent packing and its decoding; its own
pipeline knows all of that, so a request runs the whole pipeline call (prompt in, picture
out) and this backend supplies what the API decides: the sampler, `cfgScale` as the family
means it (families.py), the seed's noise, progress and cancel through the per-step
callback, the edit inputs, the `scheduler`'s sigma spacing (families.FLOW_SCHEDULES) and
the request's LoRAs (peft adapters on the pipeline's own modules, loaded once each and
switched per request by loras.PipelineLoras, as the SD backend does). Stages are reported
as the SD backend reports them: loading until the prompt is encoded, one diffusion step
per callback, decoding after the last step.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging

from diffusiond.backends.allocator import reuse_large_blocks, share_one_malloc_arena
from diffusiond.backends.base import (
    BackendInfo,
    CancelCheck,
    GenerationCancelled,
    ImageSpec,
    PreviewCallback,
    StageCallback,
)
from diffusiond.backends.component_pipeline import build_pipeline
from diffusiond.backends.components import ComponentFiles
from diffusiond.backends.editing import PreparedEdit, paste_back, prepare_edit
from diffusiond.backends.families import (
    FLOW_SAMPLERS,
    Family,
    edit_pipeline_name,
    family_refusal,
    flow_schedule_overrides,
    guidance_kwargs,
)
from diffusiond.backends.lora_files import LoraCatalog
from diffusiond.backends.loras import PipelineLoras
from diffusiond.backends.offload import DEFAULT_PIXELS, Placement
from diffusiond.backends.precision import dtype_name, resolve_dtype
from diffusiond.backends.previews import latents_to_preview
from diffusiond.backends.runtime import out_of_memory_named, prepare_thread, resolve_device
from diffusiond.backends.shared_pipeline import share_pipeline
from diffusiond.errors import ModelLoadError
from diffusiond.jobs.models import Stage
from diffusiond.memory import trim_heap

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class UnsupportedRequest(ValueError):
    """A request this family cannot draw (a sampler, a negative prompt, a size, an edit)."""


def make_flow_scheduler(
    sampler: str, base_config: Any, generator: torch.Generator, schedule: str = "discrete"
) -> Any:
    """A fresh scheduler for `sampler` on the API's `schedule` (a `scheduler` name), built
    from the model's flow-matching scheduler config.

    The stochastic ones (euler_a, lcm) draw fresh noise every step, from the generator
    their `step` is given; the pipelines give none (torch's global one would be used, and
    a seed would not reproduce), so this request's own generator is bound to it.
    """
    choice = FLOW_SAMPLERS[sampler]
    config = dict(base_config)
    overrides = {**choice.overrides, **flow_schedule_overrides(schedule)}
    if choice.uses_flow_shift:
        overrides["flow_shift"] = float(config.get("shift", 1.0))
    scheduler = getattr(diffusers, choice.scheduler_class).from_config(config, **overrides)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step = scheduler.step

        def seeded_step(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("generator", generator)
            return step(*args, **kwargs)

        scheduler.step = seeded_step
    return scheduler


def unpack_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[batch, channels, h, w] latents from a pipeline's step tensors: FLUX-style token
    sequences of 2x2 patches are folded back (each patch's mean), video-shaped latents
    (Qwen-Image's single frame) lose their frame axis."""
    if latents.ndim == 5:
        return latents[:, :, 0]
    if latents.ndim != 3:
        return latents
    batch, tokens, width_channels = latents.shape
    columns = max(1, width // 16)
    rows = max(1, tokens // columns)
    if rows * columns != tokens or width_channels % 4:
        rows, columns = 1, tokens
    patches = latents.reshape(batch, rows, columns, width_channels // 4, 2, 2)
    return patches.mean(dim=(4, 5)).permute(0, 3, 1, 2)


def check_request(family: Family, spec: ImageSpec) -> None:
    """Refuse, with a message naming the field, what this family cannot draw (the API
    refuses the same with a 400 before the job is accepted: see families.family_refusal)."""
    refusal = family_refusal(family, spec)
    if refusal is not None:
        raise UnsupportedRequest(refusal.message)


class FlowBackend:
    """Loads one flow-matching family's diffusers folder and draws images with it."""

    def __init__(
        self,
        *,
        model_path: Path,
        family: Family,
        device: str,
        torch_threads: int,
        dtype: str = "auto",
        components: ComponentFiles | None = None,
        loras_dir: Path | None = None,
        offload: str = "auto",
        max_pixels: int = DEFAULT_PIXELS,
        gguf_weights: str = "dequantize",
    ) -> None:
        share_one_malloc_arena()  # before the engine's workers start: see allocator.py
        self._model_path = model_path
        self._components = components  # None: model_path is a diffusers folder
        self._gguf_weights = gguf_weights  # a GGUF diffusion model's: settings.gguf_weights
        self._family = family
        self._placement = Placement(offload, max_pixels)
        self._requested_device = device
        self._requested_dtype = dtype
        self._torch_threads = torch_threads
        self._pipeline: Any = None
        self._device = "cpu"
        self._dtype_name = "float32"
        self._load_lock = threading.Lock()
        self._thread_state = threading.local()
        self._lora_catalog = LoraCatalog(loras_dir)
        self._loras: PipelineLoras | None = None

    def load(self) -> None:
        with self._load_lock:
            if self._pipeline is None:
                self._pipeline = self._load()
                self._loras = self._pipeline_loras(self._pipeline)

    def _pipeline_loras(self, pipeline: Any) -> PipelineLoras:
        """The LoRAs of requests, applied to `pipeline`'s transformer (backends/loras.py);
        the per-request pipelines of `_pipeline_for` share its modules, so theirs too."""
        return PipelineLoras(pipeline, self._lora_catalog, architecture=lambda: self._family.name)

    def info(self) -> BackendInfo:
        return BackendInfo(
            name="diffusers",
            model=str(self._model_path),
            device=self._device,
            dtype=self._dtype_name,
            architecture=self._family.name,
            components=tuple(self._components.names.items()) if self._components else (),
            offload=self._placement.mode,
        )

    def _load(self) -> Any:
        diffusers_logging.disable_progress_bar()
        torch.set_num_threads(self._torch_threads)
        self._device = resolve_device(self._requested_device)
        dtype = resolve_dtype(self._requested_dtype, self._device)
        self._dtype_name = dtype_name(dtype)
        path = self._model_path
        try:
            if self._components is not None:
                pipeline = build_pipeline(self._components, dtype, gguf_weights=self._gguf_weights)
            else:
                pipeline = getattr(diffusers, self._family.pipeline).from_pretrained(
                    str(path), dtype=dtype, local_files_only=True, low_cpu_mem_usage=True
                )
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model path {path} could not be loaded: {exc}") from exc
        self._placement.place(pipeline, self._device)  # pipeline.to(device), or offloaded
        if self._device == "cpu":
            reuse_large_blocks()  # after the load, as the SD backend: see allocator.py
        pipeline.set_progress_bar_config(disable=True)
        trim_heap()
        return pipeline

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        with out_of_memory_named(self._device):
            return self._generate(spec, on_stage, should_cancel, on_preview)

    def _generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None,
    ) -> Image:
        if self._pipeline is None or self._loras is None:
            raise RuntimeError("the model is not loaded")
        check_request(self._family, spec)
        prepare_thread(self._thread_state, self._torch_threads)
        on_stage(Stage.LOADING, 0, 1)
        edit = prepare_edit(spec, inpainting_unet=False)
        # The noise is drawn on the CPU so that a seed gives the same picture on any device.
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        pipeline = self._pipeline_for(spec, edit, generator)
        total = edit.steps_run if edit is not None else spec.steps
        self._report_encoding(pipeline, on_stage, should_cancel, total)
        callback = _StepReporter(spec, total, on_stage, should_cancel, on_preview)
        with self._loras.applied(spec.loras), torch.inference_mode():
            image: Image = pipeline(
                prompt=spec.prompt,
                **guidance_kwargs(self._family, spec.cfg_scale, spec.negative_prompt),
                **self._image_kwargs(spec, edit),
                num_inference_steps=spec.steps,
                generator=generator,
                output_type="pil",
                callback_on_step_end=callback,
            ).images[0]
        if edit is not None:
            image = paste_back(image, edit)
        on_stage(Stage.DECODING, 1, 1)
        return image

    def _pipeline_for(
        self, spec: ImageSpec, edit: PreparedEdit | None, generator: torch.Generator
    ) -> Any:
        """A pipeline for this request over the loaded modules, with its own scheduler."""
        base = self._pipeline
        class_name = self._family.pipeline
        if edit is not None:
            class_name = str(edit_pipeline_name(self._family, inpaint=edit.mask is not None))
        scheduler = make_flow_scheduler(
            spec.sampler, base.scheduler.config, generator, spec.scheduler
        )
        pipeline = share_pipeline(getattr(diffusers, class_name), base, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _image_kwargs(self, spec: ImageSpec, edit: PreparedEdit | None) -> dict[str, Any]:
        size: dict[str, Any] = {"width": spec.width, "height": spec.height}
        if edit is None:
            return size
        if edit.mask is None and self._family.img2img is None:
            # Image-to-image through the family's inpainting pipeline: a mask over all of it.
            edit = dataclasses.replace(edit, inpaint=True)
        return {**size, **edit.call_kwargs(spec.width, spec.height)}

    @staticmethod
    def _report_encoding(
        pipeline: Any, on_stage: StageCallback, should_cancel: CancelCheck, total: int
    ) -> None:
        """Loading ends when the prompt is encoded: wrap this request's pipeline's own
        `encode_prompt` (an attribute of this instance only) to say so. Some pipelines
        encode the negative prompt in a second call: only the first one reports."""
        encode = pipeline.encode_prompt
        reported = False

        def encode_and_report(*args: Any, **kwargs: Any) -> Any:
            nonlocal reported
            encoded = encode(*args, **kwargs)
            if should_cancel():
                raise GenerationCancelled
            if not reported:
                reported = True
                on_stage(Stage.LOADING, 1, 1)
                on_stage(Stage.DIFFUSION, 0, total)
            return encoded

        pipeline.encode_prompt = encode_and_report


class _StepReporter:
    """The per-step callback: progress, cancel within the step, previews, then decoding."""

    def __init__(
        self,
        spec: ImageSpec,
        total: int,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None,
    ) -> None:
        self._spec = spec
        self._total = total
        self._on_stage = on_stage
        self._should_cancel = should_cancel
        self._on_preview = on_preview
        self._last_preview = 0

    def __call__(self, pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
        total = self._total
        # Second-order samplers run more timesteps than the user's steps: map back.
        timesteps = max(getattr(pipe, "_num_timesteps", 0) or len(pipe.scheduler.timesteps), 1)
        step = min(total, math.ceil((index + 1) * total / timesteps))
        self._on_stage(Stage.DIFFUSION, step, total)
        if self._should_cancel():
            raise GenerationCancelled
        every = self._spec.preview_every
        if self._on_preview is not None and every and step - self._last_preview >= every:
            self._last_preview = step
            grid = unpack_latents(tensors["latents"], self._spec.width, self._spec.height)
            self._on_preview(step, latents_to_preview(grid))
        if index + 1 >= timesteps:
            self._on_stage(Stage.DECODING, 0, 1)
            # The steps' freed blocks go back before the decode's larger ones are taken
            # (kept in the heap, allocator.reuse_large_blocks, they would add up).
            trim_heap()
        return tensors
