"""A tiny SD-shaped model in both forms: a diffusers folder and one ldm-layout file."""

from __future__ import annotations

from pathlib import Path

from diffusiond.backends.builtin_model import ensure_builtin_model


def tiny_model_files(home: Path) -> tuple[Path, Path]:
    """(diffusers folder, .safetensors in the CompVis/ldm layout) of the built-in model."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from diffusiond.backends.ldm_layout import pipeline_to_ldm

    folder = ensure_builtin_model(home)
    single_file = home / "tiny-sd1.safetensors"
    if not single_file.is_file():
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        save_file(pipeline_to_ldm(pipeline), str(single_file))
    return folder, single_file
