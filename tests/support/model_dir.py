"""A models dir of two small models shaped like the built-in one, with other weights.

`alpha` is a diffusers folder: the built-in model's folder with its UNet's weights moved by
a little seeded noise. `beta` is one .safetensors file in the CompVis/ldm layout, with
other noise. Both load with --model-config set to the built-in folder (their shapes are
the built-in model's, not SD 1.5's). Beside them lie what is not a model: `loras/`, a text
file, and a folder with no model_index.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from diffusiond.backends.builtin_model import ensure_builtin_model

if TYPE_CHECKING:
    import torch

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def _perturbed_unet(source: Path, seed: int) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(source))
    generator = torch.Generator().manual_seed(seed)
    moved: dict[str, torch.Tensor] = {}
    for key, weights in state.items():
        moved[key] = weights
        if weights.is_floating_point() and weights.numel() > 1:
            noise = torch.randn(weights.shape, generator=generator)
            moved[key] = weights + 0.05 * weights.std().nan_to_num() * noise
    return moved


def perturbed_folder(builtin: Path, target: Path, seed: int) -> Path:
    """The built-in folder copied to `target`, its UNet's weights moved by seeded noise."""
    from safetensors.torch import save_file

    if (target / "model_index.json").is_file():
        return target
    staging = target.with_name(f".{target.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(builtin, staging)
    save_file(_perturbed_unet(builtin / UNET_WEIGHTS, seed), str(staging / UNET_WEIGHTS))
    staging.rename(target)
    return target


def single_file_of(folder: Path, target: Path) -> Path:
    """A diffusers folder saved as one ldm-layout .safetensors file."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from diffusiond.backends.ldm_layout import pipeline_to_ldm

    if not target.is_file():
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        save_file(pipeline_to_ldm(pipeline), str(target))
    return target


def two_model_dir(home: Path, models_dir: Path) -> Path:
    """`models_dir` with alpha/ and beta.safetensors (and the non-models); returned."""
    builtin = ensure_builtin_model(home)
    models_dir.mkdir(parents=True, exist_ok=True)
    perturbed_folder(builtin, models_dir / "alpha", seed=1)
    scratch = home / "beta-folder"
    single_file_of(perturbed_folder(builtin, scratch, seed=2), models_dir / "beta.safetensors")
    (models_dir / "loras").mkdir(exist_ok=True)
    (models_dir / "notes.txt").write_text("not a model")
    (models_dir / "empty-folder").mkdir(exist_ok=True)
    return models_dir
