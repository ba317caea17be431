"""The diffusers backend: a Stable Diffusion pipeline on PyTorch, loaded once."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging

from diffusiond.backends.acceleration import compile_pipeline, use_channels_last
from diffusiond.backends.allocator import reuse_large_blocks, share_one_malloc_arena
from diffusiond.backends.base import (
    BackendInfo,
    CancelCheck,
    GenerationCancelled,
    ImageSpec,
    PreviewCallback,
    StageCallback,
)
from diffusiond.backends.builtin_model import BUILTIN_MODEL_NAME, ensure_builtin_model
from diffusiond.backends.clip_skip import encode_skipping_layers, pipeline_clip_skip
from diffusiond.backends.editing import (
    PreparedEdit,
    edit_pipeline,
    is_inpainting_unet,
    paste_back,
    prepare_edit,
)
from diffusiond.backends.k_samplers import unconditional_capture
from diffusiond.backends.lora_files import LoraCatalog
from diffusiond.backends.loras import PipelineLoras
from diffusiond.backends.offload import DEFAULT_PIXELS, Placement
from diffusiond.backends.precision import dtype_name, resolve_dtype
from diffusiond.backends.previews import latents_to_preview
from diffusiond.backends.runtime import out_of_memory_named, prepare_thread, resolve_device
from diffusiond.backends.samplers import make_scheduler
from diffusiond.backends.single_file import (
    SINGLE_FILE_SUFFIXES,
    load_single_file,
    read_safetensors,
)
from diffusiond.errors import ModelLoadError
from diffusiond.jobs.models import Stage
from diffusiond.memory import trim_heap
from diffusiond.sampling import pipeline_guidance, runs_unconditional

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

# Larger images are decoded in tiles (see _decode).
TILED_DECODE_PIXELS = 768 * 768

# model_index.json's pipeline class -> the diffusers class that loads it
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionInpaintPipeline",  # a 9-channel UNet: used for every request (editing.py)
    "StableDiffusionXLInpaintPipeline",
)


def check_model_path(path: Path) -> None:
    """Fail fast, naming the path, when `path` cannot be a model we load."""
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model file {path} is not a .safetensors, .ckpt or .gguf checkpoint "
                "(give one of those, or a diffusers model folder)"
            )
        return
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is neither a file nor a folder")
    pipeline_class_name(path)


def pipeline_class_name(path: Path) -> str:
    """The pipeline class a diffusers folder names in its model_index.json, if supported."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"model path {path} has no model_index.json (not a diffusers model folder)"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"model path {path}: model_index.json is unreadable: {exc}") from exc
    if class_name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"model path {path}: pipeline {class_name!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_PIPELINES)})"
        )
    return str(class_name)


def folder_architecture(path: Path, class_name: str) -> str:
    """sd1, sd2 or sdxl for a diffusers folder (SD 2.x has a 1024-wide text encoder)."""
    if class_name.startswith("StableDiffusionXL"):
        return "sdxl"
    try:
        text = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return "sd1"
    return "sd2" if text.get("hidden_size") == 1024 else "sd1"


class DiffusersBackend:
    """Loads a Stable Diffusion model (a diffusers folder, a single-file checkpoint, or the
    built-in model) and draws images."""

    def __init__(
        self,
        *,
        model_path: Path | None,
        home: Path,
        device: str,
        torch_threads: int,
        dtype: str = "auto",
        model_config: Path | None = None,
        channels_last: bool = True,
        compile_model: bool = False,
        loras_dir: Path | None = None,
        offload: str = "auto",
        max_pixels: int = DEFAULT_PIXELS,
    ) -> None:
        share_one_malloc_arena()  # before the engine's workers start: see allocator.py
        self._model_path = model_path
        self._placement = Placement(offload, max_pixels)
        self._channels_last = channels_last
        self._compile_model = compile_model
        self._model_config = model_config
        self._home = home
        self._requested_device = device
        self._requested_dtype = dtype
        self._architecture = "unknown"
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
        """The LoRAs of requests, applied to `pipeline`'s modules (backends/loras.py)."""
        return PipelineLoras(
            pipeline,
            self._lora_catalog,
            architecture=lambda: self._architecture,
            after_load=use_channels_last if self._channels_last else None,
        )

    def info(self) -> BackendInfo:
        model = str(self._model_path) if self._model_path is not None else BUILTIN_MODEL_NAME
        return BackendInfo(
            name="diffusers",
            model=model,
            device=self._device,
            dtype=self._dtype_name,
            architecture=self._architecture,
            offload=self._placement.mode,
        )

    def _load(self) -> Any:
        diffusers_logging.disable_progress_bar()
        torch.set_num_threads(self._torch_threads)
        self._device = self._resolve_device()
        dtype = resolve_dtype(self._requested_dtype, self._device)
        self._dtype_name = dtype_name(dtype)
        path = self._model_path
        if path is None:
            path = ensure_builtin_model(self._home)
        else:
            check_model_path(path)
        if path.is_file():
            pipeline, self._architecture = load_single_file(
                path, dtype=dtype, config=self._model_config
            )
        else:
            pipeline = self._load_folder(path, dtype)
        self._placement.place(pipeline, self._device)  # pipeline.to(device), or offloaded
        if self._channels_last:
            use_channels_last(pipeline)
        if self._compile_model:
            compile_pipeline(pipeline, self._home)
        pipeline.set_progress_bar_config(disable=True)
        if self._device == "cpu":
            reuse_large_blocks()  # after the load: see allocator.py
        trim_heap()
        return pipeline

    def _load_folder(self, path: Path, dtype: torch.dtype) -> Any:
        class_name = pipeline_class_name(path)
        self._architecture = folder_architecture(path, class_name)
        extra: dict[str, Any] = {}
        if class_name in ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"):
            extra = {"safety_checker": None, "requires_safety_checker": False}
        try:
            # The big models are read without a memory map, straight into `dtype` (see
            # SafetensorsFile); diffusers loads the rest. No float32 copy of a half-precision
            # model is ever made.
            for component in ("unet", "vae"):
                model = self._read_component(path, component, dtype)
                if model is not None:
                    extra[component] = model
            return getattr(diffusers, class_name).from_pretrained(
                str(path), dtype=dtype, local_files_only=True, low_cpu_mem_usage=True, **extra
            )
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model path {path} could not be loaded: {exc}") from exc

    @staticmethod
    def _read_component(path: Path, component: str, dtype: torch.dtype) -> Any:
        """A diffusers model of the folder read without a memory map; None where its
        weights are not one plain .safetensors file (diffusers then loads it)."""
        weights = path / component / "diffusion_pytorch_model.safetensors"
        index = json.loads((path / "model_index.json").read_text()).get(component)
        if not weights.is_file() or not isinstance(index, list) or index[0] != "diffusers":
            return None
        model_class = getattr(diffusers, index[1])
        state = read_safetensors(weights, dtype)
        model = model_class.from_single_file(
            state, config=str(path), subfolder=component, torch_dtype=dtype, local_files_only=True
        )
        del state
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ModelLoadError(f"model path {path}: {weights} lacks some of the weights")
        return model

    def _resolve_device(self) -> str:
        return resolve_device(self._requested_device)

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
        self._prepare_thread()
        on_stage(Stage.LOADING, 0, 1)
        edit = prepare_edit(spec, inpainting_unet=is_inpainting_unet(self._pipeline))
        if edit is None:
            pipeline = self._pipeline_for(spec.sampler, spec.scheduler)
        else:
            scheduler = make_scheduler(
                spec.sampler, self._pipeline.scheduler.config, spec.scheduler
            )
            pipeline = edit_pipeline(self._pipeline, self._architecture, edit, scheduler)
        with self._loras.applied(spec.loras), torch.inference_mode():
            embeds = self._encode(pipeline, spec)
            if should_cancel():
                raise GenerationCancelled
            on_stage(Stage.LOADING, 1, 1)
            latents = self._diffuse(
                pipeline, spec, embeds, on_stage, should_cancel, on_preview=on_preview, edit=edit
            )
            del embeds  # the text encoder's outputs are not needed for decoding
            if should_cancel():
                raise GenerationCancelled
            on_stage(Stage.DECODING, 0, 1)
            image: Image = self._decode(pipeline, latents)
        if edit is not None:
            image = paste_back(image, edit)
        on_stage(Stage.DECODING, 1, 1)
        return image

    def _prepare_thread(self) -> None:
        prepare_thread(self._thread_state, self._torch_threads)

    def _encode(self, pipeline: Any, spec: ImageSpec) -> dict[str, Any]:
        """The prompt's embeddings, as keyword arguments of the pipeline's call."""
        guided = runs_unconditional(spec.sampler, spec.cfg_scale)
        negative = spec.negative_prompt or None
        clip_skip = pipeline_clip_skip(pipeline, spec.clip_skip, self._architecture == "sdxl")
        if self._architecture == "sdxl":
            embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
                spec.prompt,
                device=self._device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=negative,
                clip_skip=clip_skip,
            )
            return {
                "prompt_embeds": embeds,
                "negative_prompt_embeds": negative_embeds,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled,
            }
        if clip_skip is not None:
            return encode_skipping_layers(pipeline, spec.prompt, negative, guided, clip_skip)
        embeds, negative_embeds = pipeline.encode_prompt(
            spec.prompt, self._device, 1, guided, negative
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}

    @staticmethod
    def _decode(pipeline: Any, latents: Any) -> Image:
        vae = pipeline.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            # SD's VAE overflows in float16 (diffusers upcasts it the same way).
            vae.to(torch.float32)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        # The diffusion's freed activations go back to the OS before the decode's larger
        # ones are allocated: kept in the heap (allocator.reuse_large_blocks) they would
        # add to the decode's peak (3.37 -> 3.18 GB at 512x512 bf16, the same image).
        trim_heap()
        pixels = latents.shape[-1] * latents.shape[-2] * 64
        tiled = pixels > TILED_DECODE_PIXELS and hasattr(vae, "enable_tiling")
        if tiled:
            # In overlapping tiles of the VAE's own size: the decoder's activations grow
            # with the image, and past this size they would outweigh a half-precision model.
            # Through `decode` (which tiles when told to), not `tiled_decode`: CUDA offload
            # hooks wrap `decode` only.
            vae.enable_tiling()
        try:
            decoded = vae.decode(latents, return_dict=False)[0]
        finally:
            if tiled:
                vae.disable_tiling()
        del latents
        image: Image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
        return image

    def _diffuse(
        self,
        pipeline: Any,
        spec: ImageSpec,
        embeds: dict[str, Any],
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        *,
        on_preview: PreviewCallback | None,
        edit: PreparedEdit | None = None,
    ) -> Any:
        last_preview = 0
        # An edit runs only the tail of the schedule: int(steps x strength) steps.
        total = edit.steps_run if edit is not None else spec.steps

        def after_step(pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            nonlocal last_preview
            # Second-order samplers run more timesteps than the user's steps: map back.
            timesteps = max(getattr(pipe, "_num_timesteps", 0) or len(pipe.scheduler.timesteps), 1)
            step = min(total, math.ceil((index + 1) * total / timesteps))
            on_stage(Stage.DIFFUSION, step, total)
            if should_cancel():
                raise GenerationCancelled
            every = spec.preview_every
            if on_preview is not None and every and step - last_preview >= every:
                last_preview = step
                on_preview(step, latents_to_preview(tensors["latents"]))
            return tensors

        on_stage(Stage.DIFFUSION, 0, total)
        # The noise is drawn on the CPU so that a seed gives the same picture on any device.
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        size = {"width": spec.width, "height": spec.height}
        images = edit.call_kwargs(**size) if edit is not None else size
        # CFG++ samplers need the unguided prediction (and may guide below 1).
        with unconditional_capture(pipeline, spec.cfg_scale):
            return pipeline(
                **embeds,
                **images,
                num_inference_steps=spec.steps,
                guidance_scale=pipeline_guidance(spec.sampler, spec.cfg_scale),
                generator=generator,
                output_type="latent",
                callback_on_step_end=after_step,
            ).images

    def _pipeline_for(self, sampler: str, scheduler: str = "discrete") -> Any:
        """A pipeline sharing the loaded modules, with its own fresh scheduler."""

        base = self._pipeline
        components = {
            **base.components,
            "scheduler": make_scheduler(sampler, base.scheduler.config, scheduler),
        }
        extra = {"requires_safety_checker": False} if "safety_checker" in components else {}
        pipeline = type(base)(**components, **extra)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
