"""Which backend draws a model: a diffusers folder's pipeline class picks it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffusiond.backends.families import family_for_pipeline

if TYPE_CHECKING:
    from diffusiond.backends.base import Backend
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
    family = family_for_pipeline(folder_pipeline_name(path) or "") if path else None
    if path is not None and family is not None:
        from diffusiond.backends.flow_backend import FlowBackend

        return FlowBackend(
            model_path=path,
            family=family,
            device=settings.device,
            torch_threads=settings.torch_threads,
            dtype=settings.dtype,
            offload=settings.offload,
            max_pixels=settings.max_pixels,
        )
    from diffusiond.backends.diffusers_backend import DiffusersBackend, check_model_path
    from diffusiond.backends.lora_files import lora_folder

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
