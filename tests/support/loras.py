"""Small LoRA files for the built-in model, made by the tests, in both formats people use.

Each file holds random `down`/`up` pairs of rank 4 for a few attention layers of the
built-in UNet (a 64-channel block with 32-wide cross-attention) and its text encoder (32
wide). `kohya` writes the kohya/AUTOMATIC1111 layout (`lora_unet_*`, `lora_te_*`, with
`.alpha`); `peft` writes diffusers' layout (`unet.`/`text_encoder.` with lora_A/lora_B).
`sdxl_header_lora` writes a file shaped like an SDXL LoRA (two text encoders, 2048-wide
cross-attention), for the wrong-architecture refusal.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
UNET_LAYERS = {  # module path in the built-in UNet -> (in features, out features)
    "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k": (32, 64),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (32, 64),
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": (64, 64),
}
TEXT_LAYERS = {  # module path in the built-in CLIP text encoder -> (in, out)
    "text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
    "text_model.encoder.layers.1.self_attn.v_proj": (32, 32),
    "text_model.encoder.layers.1.self_attn.out_proj": (32, 32),
}


def _pair(generator: torch.Generator, features: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    inputs, outputs = features
    down = torch.randn(RANK, inputs, generator=generator) * 0.5
    up = torch.randn(outputs, RANK, generator=generator) * 0.5
    return down, up


def kohya(path: Path, seed: int = 1, *, rank_scale: float = 1.0, text: bool = True) -> Path:
    """A kohya/AUTOMATIC1111 LoRA at `path`; `alpha` is the rank times `rank_scale`;
    `text=False` leaves the text encoder out (many LoRAs train the UNet only)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    parts = [("lora_unet_", UNET_LAYERS)] + ([("lora_te_", TEXT_LAYERS)] if text else [])
    for prefix, layers in parts:
        for module, features in layers.items():
            key = prefix + module.replace(".", "_")
            down, up = _pair(generator, features)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK) * rank_scale)
    save_file(tensors, str(path))
    return path


def peft(path: Path, seed: int = 2) -> Path:
    """A diffusers/peft LoRA at `path` (lora_A is the down projection, lora_B the up)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, layers in (("unet.", UNET_LAYERS), ("text_encoder.", TEXT_LAYERS)):
        for module, features in layers.items():
            down, up = _pair(generator, features)
            tensors[f"{prefix}{module}.lora_A.weight"] = down
            tensors[f"{prefix}{module}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def sdxl_header_lora(path: Path) -> Path:
    """A kohya LoRA shaped for SDXL: `lora_te1_`/`lora_te2_` and 2048-wide cross-attention."""
    tensors = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (
            torch.zeros(RANK, 2048, dtype=torch.float16)
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (
            torch.zeros(640, RANK, dtype=torch.float16)
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (
            torch.zeros(RANK, 768, dtype=torch.float16)
        ),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (
            torch.zeros(RANK, 1280, dtype=torch.float16)
        ),
    }
    save_file(tensors, str(path))
    return path


def misfit(path: Path) -> Path:
    """A LoRA that looks like one for the built-in model's architecture (sd1) but whose
    shapes fit none of its layers: loading it must fail, naming it."""
    generator = torch.Generator().manual_seed(3)
    module = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{module}.lora_down.weight": torch.randn(RANK, 768, generator=generator),
        f"{module}.lora_up.weight": torch.randn(64, RANK, generator=generator),
        f"{module}.alpha": torch.tensor(float(RANK)),
    }
    save_file(tensors, str(path))
    return path
