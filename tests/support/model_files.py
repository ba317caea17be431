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


def tiny_inpainting_model_files(home: Path) -> tuple[Path, Path]:
    """(diffusers folder, ldm-layout .safetensors) of a 9-channel inpainting model shaped
    like the built-in one: its UNet, made from a fixed seed, takes the noisy latents, the
    mask and the masked image's latents; the other modules are the built-in model's."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from diffusiond.backends.ldm_layout import pipeline_to_ldm

    folder = home / "tiny-inpainting"
    single_file = home / "tiny-inpainting.safetensors"
    if not folder.is_dir():
        base = StableDiffusionInpaintPipeline.from_pretrained(
            str(ensure_builtin_model(home)),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(9)
            unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
        pipeline = StableDiffusionInpaintPipeline(
            **{**base.components, "unet": unet}, requires_safety_checker=False
        )
        pipeline.save_pretrained(str(folder), safe_serialization=True)
        save_file(pipeline_to_ldm(pipeline), str(single_file))
    return folder, single_file
