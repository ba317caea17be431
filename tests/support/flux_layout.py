"""FLUX-layout diffusion-model files (FLUX.1, Chroma, FLUX.2) written from tiny diffusers modules.

Users download these models in their original layout: Black Forest Labs' `.safetensors`
(`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, ...), city96's
GGUF files of the same names (`general.architecture` "flux"), or ComfyUI's with a
`model.diffusion_model.` prefix. `original_layout` undoes diffusers' converter for a family
(it fuses q, k and v again, and the single blocks' q, k, v and MLP input; it swaps the final
modulation back to shift-then-scale), so a file written from a tiny module is what the loader
meets in the wild, and the module it loads can be compared with the one it came from.

The GGUF files follow city96's convert script: vectors stay F32, matrices take the asked-for
type where a row is a whole number of its blocks (F16 otherwise, as llama.cpp falls back).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from tests.support.families import _chroma, _flux1, _flux2
from tests.support.gguf_files import Q, _encoded

COMFY_PREFIX = "model.diffusion_model."
FORMATS = ("safetensors", "gguf-f16", "gguf-q8_0")
FAMILIES = ("flux1", "flux1-schnell", "chroma", "flux2")
_GGUF_TYPES = {"gguf-f16": Q.F16, "gguf-q8_0": Q.Q8_0}
_SEEDS = {"flux1": 100, "flux1-schnell": 106, "chroma": 105, "flux2": 101}

# diffusers name -> original name, by family; the fused ones are in _FUSED_* below.
_EMBEDDERS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
}
_FLUX1_RENAMES = {
    **_EMBEDDERS,
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
_FLUX2_RENAMES = {
    **_EMBEDDERS,
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
_DOUBLE_BLOCK = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "ff.linear_in": "img_mlp.0",  # FLUX.2's
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE_BLOCK = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
    "attn.to_out": "linear2",  # FLUX.2's
    "attn.to_qkv_mlp_proj": "linear1",  # FLUX.2's, already fused
}
# Original tensors that are several diffusers tensors concatenated (first dimension).
_FUSED_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FUSED_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
}
# kind -> (diffusers' prefix, renames within a block, fused tensors)
_BLOCKS: dict[str, tuple[str, dict[str, str], dict[str, tuple[str, ...]]]] = {
    "double": ("transformer_blocks", _DOUBLE_BLOCK, _FUSED_DOUBLE),
    "single": ("single_transformer_blocks", _SINGLE_BLOCK, _FUSED_SINGLE),
}
_CHROMA_APPROXIMATOR = {"linear_1": "in_layer", "linear_2": "out_layer"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_name(kind: str, index: str, inner: str, param: str) -> str | None:
    """A block tensor's original name; None when it is part of a fused one."""
    _, table, fused = _BLOCKS[kind]
    if inner not in table and any(inner in parts for parts in fused.values()):
        return None
    original = f"{kind}_blocks.{index}.{table[inner]}"
    return f"{original}.{'scale' if 'norm.' in original else param}"


def _approximator_name(stem: str, param: str) -> str:
    """Chroma's distilled guidance layer: its MLPs' and norms' original names."""
    layer = re.fullmatch(r"distilled_guidance_layer\.(layers|norms)\.(\d+)(?:\.(\w+))?", stem)
    if layer is None:  # in_proj, out_proj: named alike
        return f"{stem}.{param}"
    group, index, linear = layer.groups()
    if group == "norms":
        return f"distilled_guidance_layer.norms.{index}.scale"
    return f"distilled_guidance_layer.layers.{index}.{_CHROMA_APPROXIMATOR[linear]}.{param}"


def _renamed(name: str, renames: dict[str, str]) -> str | None:
    """The original name of a diffusers tensor; None when it is part of a fused one or the
    swapped final modulation (both made in original_layout)."""
    stem, param = name.rsplit(".", 1)
    block = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", stem)
    if block is not None:
        kind = "double" if block.group(1) == "transformer_blocks" else "single"
        return _block_name(kind, block.group(2), block.group(3), param)
    if stem.startswith("distilled_guidance_layer."):
        return _approximator_name(stem, param)
    if stem == "norm_out.linear":
        return None
    return f"{renames[stem]}.{param}"


def original_layout(family: str, module: Any) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers FLUX-layout `module` under the original names of `family`
    ("flux1", "chroma" or "flux2"): the inverse of diffusers' converter for it."""
    state = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    renames = _FLUX2_RENAMES if family == "flux2" else _FLUX1_RENAMES
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        original = _renamed(name, renames)
        if original is not None:
            out[original] = tensor.clone()
    for kind, (prefix, _, fused_names) in _BLOCKS.items():
        for index in sorted({int(n.split(".")[1]) for n in state if n.startswith(prefix + ".")}):
            for fused, parts in fused_names.items():
                for param in ("weight", "bias"):
                    names = [f"{prefix}.{index}.{part}.{param}" for part in parts]
                    if all(n in state for n in names):
                        joined = torch.cat([state[n] for n in names], dim=0)
                        out[f"{kind}_blocks.{index}.{fused}.{param}"] = joined
    for param in ("weight", "bias"):
        final = f"final_layer.adaLN_modulation.1.{param}"
        if f"norm_out.linear.{param}" in state:  # diffusers keeps (scale, shift)
            out[final] = _swap_halves(state[f"norm_out.linear.{param}"])
    return out


def write_diffusion_model(
    path: Path, family: str, module: Any, fmt: str, *, comfy: bool = False
) -> Path:
    """Write `module` as `family`'s diffusion-model file in `fmt` ("safetensors",
    "gguf-f16" or "gguf-q8_0"), under ComfyUI's prefix when `comfy`."""
    prefix = COMFY_PREFIX if comfy else ""
    state = {prefix + name: tensor for name, tensor in original_layout(family, module).items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))
        return path
    writer = GGUFWriter(str(path), arch="flux")
    for name, tensor in state.items():
        values = tensor.float().contiguous().numpy()
        kind = gguf_type(values.shape, fmt)
        writer.add_tensor(name, _encoded(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_type(shape: tuple[int, ...], fmt: str) -> GGMLQuantizationType:
    """The type a tensor of `shape` is stored in by a GGUF file of `fmt`."""
    wanted = _GGUF_TYPES[fmt]
    if len(shape) < 2:
        return Q.F32
    return Q.F16 if shape[-1] % GGML_QUANT_SIZES[wanted][0] else wanted


def as_stored(tensor: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 values `tensor` reads back as from a file of `fmt`. A diffusers tensor
    cut from an original one (q of a fused qkv) keeps its rows, so it reads back the same."""
    values = tensor.detach().float().contiguous().numpy()
    if fmt == "safetensors":
        return torch.from_numpy(values.copy())
    kind = gguf_type(values.shape, fmt)
    restored = dequantize(_encoded(values, kind), kind).astype(np.float32)
    return torch.from_numpy(restored.reshape(values.shape))


def _schnell() -> Any:
    """FLUX.1 schnell's shape: the tiny FLUX.1 transformer without a guidance embedder."""
    from diffusers import FluxTransformer2DModel

    config = dict(_flux1().transformer.config)
    return FluxTransformer2DModel.from_config({**config, "guidance_embeds": False})


_TRANSFORMERS: dict[str, Callable[[], Any]] = {
    "flux1": lambda: _flux1().transformer,
    "flux1-schnell": _schnell,
    "chroma": lambda: _chroma().transformer,
    "flux2": lambda: _flux2().transformer,
}


def tiny_transformer(variant: str) -> Any:
    """The tiny transformer of a FAMILIES variant, the same on every build (fixed seed)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' own deprecations while building
        torch.manual_seed(_SEEDS[variant])
        return _TRANSFORMERS[variant]().eval()
