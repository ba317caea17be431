"""A Stable Diffusion 1.5-shaped model with random weights, for benchmarks.

Same architecture and compute as SD 1.5 (UNet 860 M parameters, VAE 84 M, CLIP ViT-L/14
text encoder 123 M, the real CLIP tokenizer), weights drawn from a fixed seed, so it can
be built anywhere with no download. Built once and cached outside the repository:

    $DIFFUSIOND_HOME/bench/sd15-random-v1/diffusers/          a diffusers folder
    $DIFFUSIOND_HOME/bench/sd15-random-v1/sd15-random.safetensors
                                                      one file, CompVis/ldm key layout

Both are stored in float16 (2.1 GB each instead of 4.3 GB; loading converts to the
requested dtype). Its pictures are noise: it measures speed and memory, not quality.

    python -m bench.sd15_model          # build (about a minute) and print the paths
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NAME = "sd15-random-v1"
SEED = 15_2024
STORAGE_DTYPE = "float16"


@dataclass(frozen=True)
class BenchModel:
    folder: Path  # diffusers format
    single_file: Path  # ldm layout


def bench_home() -> Path:
    from diffusiond.settings import default_home

    return Path(os.environ.get("DIFFUSIOND_HOME") or default_home()) / "bench" / NAME


def ensure_sd15_model(root: Path | None = None) -> BenchModel:
    """The benchmark model's two forms, built first if they are not there yet."""
    root = root or bench_home()
    model = BenchModel(root / "diffusers", root / "sd15-random.safetensors")
    if (model.folder / "model_index.json").is_file() and model.single_file.is_file():
        return model
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    try:
        _build(staging)
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def _build(root: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusiond.backends.ldm_layout import pipeline_to_ldm
    from diffusiond.backends.single_file import clip_tokenizer, shipped_config

    config = shipped_config("sd1")
    dtype = getattr(torch, STORAGE_DTYPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(config), subfolder="unet")
        ).to(dtype)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config), subfolder="vae")).to(
            dtype
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig.from_pretrained(str(config), subfolder="text_encoder")
        ).to(dtype)
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        scheduler=PNDMScheduler.from_pretrained(str(config), subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(root / "diffusers"), safe_serialization=True)
    save_file(pipeline_to_ldm(pipeline), str(root / "sd15-random.safetensors"))


def main() -> None:
    started = time.monotonic()
    model = ensure_sd15_model()
    print(f"diffusers folder: {model.folder}")
    print(f"single file:      {model.single_file}")
    print(f"ready in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
