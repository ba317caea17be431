"""Small LoRA files for the tiny flow-family transformers (tests/support/families.py).

`peft_lora` writes diffusers' layout (`transformer.<module>.lora_A/lora_B.weight`) for a few
of the family's own layers, their shapes read from the tiny transformer built on the meta
device (no weights, nothing downloaded). `kohya_flux_lora` writes the kohya/ComfyUI FLUX
layout (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, with `.alpha`) for the
tiny FLUX.1 (one 128-wide double block and one single block), which diffusers' FLUX loader
converts. Each picks layers that tell its family apart by name (lora_files.py), as real
LoRAs of those families do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
SCALE = 0.5  # the random pairs' spread: enough to move a tiny model's picture

# family -> the modules its test LoRA trains (names in the family's diffusers transformer)
TARGETS: dict[str, tuple[str, ...]] = {
    "flux1": (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_k_proj",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    ),
    "flux2": (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.ff.linear_in",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
    ),
    "sd3": (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0",
    ),
    "zimage": (
        "layers.0.attention.to_q",
        "layers.0.feed_forward.w1",
        "noise_refiner.0.attention.to_k",
    ),
    "qwenimage": (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.img_mlp.net.0.proj",
        "transformer_blocks.0.txt_mlp.net.0.proj",
    ),
    "chroma": (
        "distilled_guidance_layer.layers.0.linear_1",
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_v",
    ),
}

# The tiny FLUX.1's layers in kohya's names -> (in features, out features).
KOHYA_FLUX_LAYERS = {
    "lora_unet_double_blocks_0_img_attn_qkv": (128, 3 * 128),
    "lora_unet_double_blocks_0_txt_attn_proj": (128, 128),
    "lora_unet_double_blocks_0_img_mlp_0": (128, 4 * 128),
    "lora_unet_single_blocks_0_linear2": (128 + 4 * 128, 128),
}


def linear_shapes(family_folder: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of a diffusers folder's transformer, by module name."""
    import diffusers

    config = json.loads((family_folder / "transformer" / "config.json").read_text())
    # diffusers warns of its own deprecated classes while it builds one (see families.py).
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _pair(generator: torch.Generator, inputs: int, outputs: int) -> tuple[torch.Tensor, ...]:
    down = torch.randn(RANK, inputs, generator=generator) * SCALE
    up = torch.randn(outputs, RANK, generator=generator) * SCALE
    return down, up


def peft_lora(family_folder: Path, family: str, path: Path, seed: int = 1) -> Path:
    """A diffusers-format LoRA of `family`'s TARGETS for the tiny model at `family_folder`."""
    shapes = linear_shapes(family_folder)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in TARGETS[family]:
        down, up = _pair(generator, *shapes[module])
        tensors[f"transformer.{module}.lora_A.weight"] = down
        tensors[f"transformer.{module}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def kohya_flux_lora(path: Path, seed: int = 2) -> Path:
    """A kohya/ComfyUI-format FLUX.1 LoRA for the tiny FLUX.1 (alpha = rank / 2)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, (inputs, outputs) in KOHYA_FLUX_LAYERS.items():
        down, up = _pair(generator, inputs, outputs)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(RANK / 2)
    save_file(tensors, str(path))
    return path


def kohya_sd3_lora(path: Path, seed: int = 3) -> Path:
    """The tiny SD 3's first joint block's query in kohya's names (which diffusers' SD 3
    loader does not convert: it loads them into no layer)."""
    generator = torch.Generator().manual_seed(seed)
    down, up = _pair(generator, 64, 64)
    key = "lora_unet_transformer_blocks_0_attn_to_q"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    save_file(tensors, str(path))
    return path
