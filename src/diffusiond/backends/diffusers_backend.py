"""The diffusers backend: a Stable Diffusion pipeline on PyTorch, loaded once."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from diffusiond.backends.base import (
    BackendInfo,
    CancelCheck,
    DeviceOutOfMemory,
    GenerationCancelled,
    ImageSpec,
    PreviewCallback,
    StageCallback,
)
from diffusiond.backends.builtin_model import BUILTIN_MODEL_NAME, ensure_builtin_model
from diffusiond.backends.previews import latents_to_preview
from diffusiond.backends.samplers import make_scheduler
from diffusiond.errors import ModelLoadError
from diffusiond.jobs.models import Stage

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


def check_model_folder(path: Path) -> None:
    """Fail fast, naming the path, when `path` cannot be a diffusers model folder."""
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder (expected a diffusers model)")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"model path {path} has no model_index.json (not a diffusers model)")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"model path {path}: model_index.json is unreadable: {exc}") from exc
    if class_name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"model path {path}: pipeline {class_name!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_PIPELINES)})"
        )


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class DiffusersBackend:
    """Loads a diffusers Stable Diffusion folder (or the built-in model) and draws images."""

    def __init__(
        self, *, model_path: Path | None, home: Path, device: str, torch_threads: int
    ) -> None:
        self._model_path = model_path
        self._home = home
        self._requested_device = device
        self._torch_threads = torch_threads
        self._pipeline: Any = None
        self._device = "cpu"
        self._dtype_name = "float32"
        self._load_lock = threading.Lock()

    def load(self) -> None:
        with self._load_lock:
            if self._pipeline is None:
                self._pipeline = self._load()

    def info(self) -> BackendInfo:
        model = str(self._model_path) if self._model_path is not None else BUILTIN_MODEL_NAME
        return BackendInfo(
            name="diffusers", model=model, device=self._device, dtype=self._dtype_name
        )

    def _load(self) -> Any:
        diffusers_logging.disable_progress_bar()
        torch.set_num_threads(self._torch_threads)
        self._device = self._resolve_device()
        dtype = torch.float16 if self._device.startswith("cuda") else torch.float32
        self._dtype_name = str(dtype).removeprefix("torch.")
        if self._model_path is None:
            path = ensure_builtin_model(self._home)
        else:
            check_model_folder(self._model_path)
            path = self._model_path
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                str(path),
                dtype=dtype,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as exc:
            raise ModelLoadError(f"model path {path} could not be loaded: {exc}") from exc
        pipeline.to(self._device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _resolve_device(self) -> str:
        wanted = self._requested_device
        has_cuda = bool(torch.cuda.is_available())
        if wanted == "auto":
            return "cuda" if has_cuda else "cpu"
        if wanted.startswith("cuda") and not has_cuda:
            raise ModelLoadError(
                f"device {wanted!r} was asked for, but PyTorch {torch.__version__} sees no "
                "CUDA device; use --device cpu"
            )
        return wanted

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        try:
            return self._generate(spec, on_stage, should_cancel, on_preview)
        except GenerationCancelled:
            raise
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise DeviceOutOfMemory(f"out of memory on {self._device}: {exc}") from exc
            raise

    def _generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None,
    ) -> Image:
        if self._pipeline is None:
            raise RuntimeError("the model is not loaded")
        on_stage(Stage.LOADING, 0, 1)
        pipeline = self._pipeline_for(spec.sampler)
        with torch.inference_mode():
            prompt_embeds, negative_embeds = pipeline.encode_prompt(
                spec.prompt,
                self._device,
                1,
                spec.cfg_scale > 1,
                spec.negative_prompt or None,
            )
            if should_cancel():
                raise GenerationCancelled
            on_stage(Stage.LOADING, 1, 1)
            latents = self._diffuse(
                pipeline,
                spec,
                (prompt_embeds, negative_embeds),
                on_stage,
                should_cancel,
                on_preview=on_preview,
            )
            if should_cancel():
                raise GenerationCancelled
            on_stage(Stage.DECODING, 0, 1)
            vae = pipeline.vae
            decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            image: Image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
        on_stage(Stage.DECODING, 1, 1)
        return image

    def _diffuse(
        self,
        pipeline: Any,
        spec: ImageSpec,
        embeds: tuple[Any, Any],
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        *,
        on_preview: PreviewCallback | None,
    ) -> Any:
        last_preview = 0

        def after_step(pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            nonlocal last_preview
            # Second-order samplers run more timesteps than the user's steps: map back.
            timesteps = max(len(pipe.scheduler.timesteps), 1)
            step = min(spec.steps, math.ceil((index + 1) * spec.steps / timesteps))
            on_stage(Stage.DIFFUSION, step, spec.steps)
            if should_cancel():
                raise GenerationCancelled
            every = spec.preview_every
            if on_preview is not None and every and step - last_preview >= every:
                last_preview = step
                on_preview(step, latents_to_preview(tensors["latents"]))
            return tensors

        on_stage(Stage.DIFFUSION, 0, spec.steps)
        # The noise is drawn on the CPU so that a seed gives the same picture on any device.
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        return pipeline(
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.steps,
            guidance_scale=spec.cfg_scale,
            generator=generator,
            output_type="latent",
            callback_on_step_end=after_step,
        ).images

    def _pipeline_for(self, sampler: str) -> Any:
        """A pipeline sharing the loaded modules, with its own fresh scheduler."""

        base = self._pipeline
        components = {
            **base.components,
            "scheduler": make_scheduler(sampler, base.scheduler.config),
        }
        pipeline = type(base)(**components, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
