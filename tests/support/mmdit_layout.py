"""Diffusion-model files of SD 3.x, Z-Image and Qwen-Image in the layout users download.

`original_layout` undoes diffusers' single-file converter for a family, so a tiny diffusers
transformer (tests/support/families.py) can be written in Stability's, Tongyi's or Qwen's
original names; `write_diffusion_model` writes it as .safetensors or as a GGUF the way
city96's converter does (original names, `general.architecture` set, vectors kept in F32).
The tiny modules keep their family's head width with one head, so the rope axes the loader
takes from the class defaults are theirs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from tests.support.gguf_files import Q, _encoded

COMFY_PREFIX = "model.diffusion_model."
FORMATS = ("safetensors", "gguf-f16", "gguf-q8_0")
# What city96's files name each family's architecture.
GGUF_ARCHITECTURES = {"sd3": "sd3", "zimage": "lumina2", "qwenimage": "qwen_image"}
_GGUF_TYPES = {"gguf-f16": Q.F16, "gguf-q8_0": Q.Q8_0}
_SMALL = 1024  # city96 keeps tensors this small unquantized

# SD3: a joint block's diffusers names (after transformer_blocks.N.) -> Stability's
# (after joint_blocks.N.); the q, k, v projections fused into one qkv each.
_SD3_BLOCK = {
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn.norm_q.": "x_block.attn.ln_q.",
    "attn.norm_k.": "x_block.attn.ln_k.",
    "attn.norm_added_q.": "context_block.attn.ln_q.",
    "attn.norm_added_k.": "context_block.attn.ln_k.",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "attn2.norm_q.": "x_block.attn2.ln_q.",
    "attn2.norm_k.": "x_block.attn2.ln_k.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
_SD3_FUSED = {
    "x_block.attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "context_block.attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
    "x_block.attn2.qkv.": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."),
}
_SD3_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
# Z-Image: diffusers' names -> Tongyi's (anywhere in a name); q, k, v fused into qkv.
_ZIMAGE_RENAMES = {
    "all_x_embedder.2-1.": "x_embedder.",
    "all_final_layer.2-1.": "final_layer.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_q.": ".attention.q_norm.",
    ".attention.norm_k.": ".attention.k_norm.",
}


def _swapped(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous keeps (scale, shift), Stability (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _take_fused(
    weights: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The q, k, v tensors under `prefix` concatenated, per weight/bias, popped from weights."""
    out: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        names = [f"{prefix}{part}{kind}" for part in parts]
        if names[0] in weights:
            out[kind] = torch.cat([weights.pop(name) for name in names])
    return out


def _sd3_original(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    layers = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("transformer_"))
    for index in range(layers):
        ours, theirs = f"transformer_blocks.{index}.", f"joint_blocks.{index}."
        for fused, parts in _SD3_FUSED.items():
            for kind, tensor in _take_fused(weights, ours, parts).items():
                out[f"{theirs}{fused}{kind}"] = tensor
        for name in [name for name in weights if name.startswith(ours)]:
            rest = name[len(ours) :]
            part = next(key for key in _SD3_BLOCK if rest.startswith(key))
            tensor = weights.pop(name)
            if index == layers - 1 and part == "norm1_context.linear.":
                tensor = _swapped(tensor)  # the last block's context side is pre-only
            out[theirs + _SD3_BLOCK[part] + rest[len(part) :]] = tensor
    for name in list(weights):
        part = next(key for key in _SD3_TOP if name.startswith(key))
        tensor = weights.pop(name)
        if part == "norm_out.linear.":
            tensor = _swapped(tensor)
        out[_SD3_TOP[part] + name[len(part) :]] = tensor
    return out


def _zimage_original(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    parts = ("to_q.", "to_k.", "to_v.")
    for name in [name for name in weights if name.endswith(".attention.to_q.weight")]:
        prefix = name.removesuffix("to_q.weight")
        out[f"{prefix}qkv.weight"] = _take_fused(weights, prefix, parts)["weight"]
    for name in list(weights):
        new = name
        for ours, theirs in _ZIMAGE_RENAMES.items():
            new = new.replace(ours, theirs)
        out[new] = weights.pop(name)
    return out


def _qwenimage_original(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: weights.pop(name) for name in list(weights)}


_INVERSES: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "sd3": _sd3_original,
    "zimage": _zimage_original,
    "qwenimage": _qwenimage_original,
}


def original_layout(family: str, module: Any) -> dict[str, torch.Tensor]:
    """`module`'s weights (a diffusers transformer of `family`) in the family's original
    names: what diffusers' single-file converter for the family turns back into the module's."""
    weights = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    out = _INVERSES[family](weights)
    assert not weights, f"no original name for {sorted(weights)[0]}"
    return out


def _gguf_type(values: torch.Tensor, wanted: Any) -> Any:
    """city96's choice: vectors and small tensors F32, what a row cannot hold in whole
    blocks F16, the rest the type asked for."""
    if values.ndim <= 1 or values.numel() <= _SMALL:
        return Q.F32
    if values.shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        return Q.F16
    return wanted


def write_gguf(path: Path, family: str, tensors: dict[str, torch.Tensor], wanted: Any) -> None:
    """`tensors` as a city96-style GGUF of type `wanted` (Q.F16 or Q.Q8_0)."""
    writer = GGUFWriter(str(path), arch=GGUF_ARCHITECTURES[family])
    for name, tensor in tensors.items():
        kind = _gguf_type(tensor, wanted)
        values = tensor.detach().float().contiguous().numpy()
        writer.add_tensor(name, _encoded(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_diffusion_model(
    path: Path, family: str, module: Any, fmt: str, *, comfy: bool = False
) -> Path:
    """`module` written to `path` in the family's original names as `fmt` (one of FORMATS),
    under ComfyUI's prefix when `comfy`."""
    from safetensors.torch import save_file

    tensors = original_layout(family, module)
    if comfy:
        tensors = {COMFY_PREFIX + name: tensor for name, tensor in tensors.items()}
    if fmt == "safetensors":
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    else:
        write_gguf(path, family, tensors, _GGUF_TYPES[fmt])
    return path


def sd35_medium_like() -> Any:
    """An SD 3.5 medium-shaped transformer: rms qk norms and dual attention in block 0
    (of two, so one block has a full context side and the last a pre-only one)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=1,
        caption_projection_dim=64,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def tiny_transformer(case: str, seed: int = 7) -> Any:
    """A tiny transformer: a family's from families.py ("sd3", "zimage", "qwenimage") or
    "sd35m" (sd35_medium_like), made under a fixed seed."""
    from tests.support import families

    builders: dict[str, Callable[[], Any]] = {
        "sd3": lambda: families._sd3().transformer,
        "zimage": lambda: families._zimage().transformer,
        "qwenimage": lambda: families._qwenimage().transformer,
        "sd35m": sd35_medium_like,
    }
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' and transformers' own warnings on building
        torch.manual_seed(seed)
        return builders[case]().eval()
