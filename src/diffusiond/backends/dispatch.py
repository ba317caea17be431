"""Which backend draws a model: a diffusers folder's pipeline class picks it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffusiond.backends.families import family_for_pipeline

if TYPE_CHECKING:
    from diffusiond.backends.base import Backend
    from diffusiond.backends.components import ComponentFiles
    from diffusiond.settings import Settings


def folder_pipeline_name(path: Path) -> str | None:
    """The `_class_name` a diffusers folder's model_index.json names; None when `path` is
    not a folder with a readable one (the SD backend then says what is wrong with it)."""
    try:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def backend_for_model_path(path: Path | None, settings: Settings) -> Backend:
    """The backend for the model at `path` (None: the built-in model), not loaded yet.

    A folder whose pipeline is a flow-matching family's goes to the flow backend; anything
    else to the Stable Diffusion backend, which checks the path and fails naming it.
    """
    from diffusiond.backends.lora_files import lora_folder

    family = family_for_pipeline(folder_pipeline_name(path) or "") if path else None
    if path is not None and family is None:
        single = flow_single_file(path, settings)
        if single is not None:
            return backend_for_components(single, settings)
    if path is not None and family is not None:
        from diffusiond.backends.flow_backend import FlowBackend

        return FlowBackend(
            model_path=path,
            family=family,
            device=settings.device,
            torch_threads=settings.torch_threads,
            dtype=settings.dtype,
            loras_dir=lora_folder(settings.models_dir, settings.loras_dir),
            offload=settings.offload,
            max_pixels=settings.max_pixels,
        )
    from diffusiond.backends.diffusers_backend import DiffusersBackend, check_model_path

    if path is not None:
        check_model_path(path)
    return DiffusersBackend(
        model_path=path,
        home=settings.home,
        device=settings.device,
        torch_threads=settings.torch_threads,
        dtype=settings.dtype,
        model_config=settings.model_config,
        compile_model=settings.compile,
        loras_dir=lora_folder(settings.models_dir, settings.loras_dir),
        offload=settings.offload,
        max_pixels=settings.max_pixels,
    )


def flow_single_file(path: Path, settings: Settings) -> ComponentFiles | None:
    """A .safetensors/.gguf file of a flow family as components of that one file (its
    parts under their ComfyUI prefixes); None for any other path. A file of the diffusion
    model alone is a ModelLoadError saying to give the other parts as components."""
    from diffusiond.backends.components import (
        COMPONENT_SUFFIXES,
        detect_family,
        single_file_components,
        tensor_names,
    )

    if not path.is_file() or path.suffix.lower() not in COMPONENT_SUFFIXES:
        return None
    try:
        keys = tensor_names(path)
    except (OSError, ValueError):
        return None  # the SD loader says what is wrong with it, naming the file
    family = detect_family(keys)
    if family is None:
        return None
    return single_file_components(path, family, keys, tokenizers=settings.tokenizers)


def backend_for_components(components: ComponentFiles, settings: Settings) -> Backend:
    """The flow backend for a model of split component files (backends/components.py)."""
    from diffusiond.backends.families import FAMILIES
    from diffusiond.backends.flow_backend import FlowBackend
    from diffusiond.backends.lora_files import lora_folder

    return FlowBackend(
        model_path=components.files["diffusion_model"],
        family=FAMILIES[components.family],
        device=settings.device,
        torch_threads=settings.torch_threads,
        dtype=settings.dtype,
        components=components,
        loras_dir=lora_folder(settings.models_dir, settings.loras_dir),
        offload=settings.offload,
        max_pixels=settings.max_pixels,
        gguf_weights=settings.gguf_weights,
    )
