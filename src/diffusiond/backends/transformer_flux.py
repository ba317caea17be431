"""The FLUX-layout diffusion models (FLUX.1 dev and schnell, Chroma, FLUX.2 klein) from the
tensors of a component file in their original layout.

Users download these as Black Forest Labs publish them (`double_blocks.N.img_attn.qkv.weight`,
`single_blocks.N.linear1.weight`, ...; Chroma's `distilled_guidance_layer.*`, FLUX.2's
`single_stream_modulation.*`), as city96's GGUF files of the same names, or with ComfyUI's
`model.diffusion_model.` prefix. The prefix is dropped here (FLUX.2's converter would not),
the names are converted by diffusers' own single-file converter for the family, and the
config is read from the converted tensors' shapes; what no tensor records (the rope axes and
theta) is the class default, which is the published models' value.

diffusers 0.42.1's FLUX.1 and Chroma converters assume the published width (3072, MLP 4x)
when they cut a single block's fused `linear1` into q, k, v and the MLP input. That one cut
is made here from the tensor's own shape, and the converter is handed an empty stand-in, so
any width (the tests' tiny models too) converts the same way.

The module is built with its parameters on the meta device (its non-persistent buffers, like
Chroma's modulation index, computed as usual) and the converted tensors are assigned to it as
they are: no float32 detour, no second copy of the weights.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends.components import COMFY_PREFIX, detect_family
from diffusiond.backends.gguf_weights import (
    is_quantized,
    shapes_of,
    use_quantized_linears,
    value_shape,
)
from diffusiond.errors import ModelLoadError

# The single-block widths diffusers' FLUX.1 and Chroma converters cut linear1 by.
_CONVERTER_INNER = 3072
_CONVERTER_MLP = 4 * 3072
_SINGLE_LINEAR1 = re.compile(r"single_blocks\.(\d+)\.linear1\.(weight|bias)")
_SINGLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_CHROMA_ROPE_WARNING = r"`FluxPosEmbed` is deprecated"

Config = dict[str, Any]


class _Unfit(ValueError):
    """Tensor shapes that no config of the family fits."""


@dataclass(frozen=True)
class _Layout:
    module_class: str  # diffusers' model class
    converter: str  # its function in diffusers.loaders.single_file_utils
    config: Callable[[Mapping[str, torch.Tensor]], Config]
    # FLUX.1's and Chroma's converters: each tensor taken by name, and single blocks'
    # linear1 cut at the published width (FLUX.2's renames whatever it is given)
    flux1_style: bool


def load_flux_layout(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    """`family`'s transformer ("flux1", "chroma" or "flux2") from `state_dict`, the tensors
    read from `path` in their original names, built in `dtype`; a ModelLoadError naming
    `path` and the first tensor at fault when they are not such a model. The tensors are
    taken out of `state_dict` (as diffusers' converters take them out of theirs), so a fused
    tensor is freed once it is cut and its parts are copied."""
    layout = _LAYOUTS[family]
    original = {name.removeprefix(COMFY_PREFIX): tensor for name, tensor in state_dict.items()}
    state_dict.clear()
    found = detect_family(original)
    if found != family:
        what = f"a {found} model" if found else "none of the FLUX-layout models"
        raise ModelLoadError(f"diffusion model {path}: its tensors are {what}, not {family}")
    converted = _converted(layout, original, path)
    try:
        config = layout.config(shapes_of(converted))
    except KeyError as exc:
        raise ModelLoadError(
            f"diffusion model {path}: tensor {exc.args[0]} (diffusers' name) is missing"
        ) from None
    except _Unfit as exc:
        raise ModelLoadError(f"diffusion model {path}: {exc}") from None
    return _built(layout, config, converted, dtype, path)


def _converted(
    layout: _Layout, original: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """The diffusers-named tensors of `original`; every original tensor must be used."""
    from diffusers.loaders import single_file_utils

    checkpoint = original  # emptied by the converter as it goes
    names = sorted(checkpoint)
    cut = _cut_linear1(checkpoint, path) if layout.flux1_style else {}
    convert = getattr(single_file_utils, layout.converter)
    try:
        converted: dict[str, torch.Tensor] = convert(checkpoint)
    except KeyError as exc:
        raise ModelLoadError(f"diffusion model {path}: {_key_error(layout, names, exc)}") from None
    except (IndexError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"diffusion model {path}: cannot be converted: {exc}") from None
    if checkpoint:  # what the FLUX.1 and Chroma converters did not take
        raise ModelLoadError(
            f"diffusion model {path}: unexpected tensor {sorted(checkpoint)[0]} "
            f"(not a {layout.module_class})"
        )
    converted.update(cut)
    return converted


def _key_error(layout: _Layout, names: list[str], exc: KeyError) -> str:
    """What a converter's KeyError means: FLUX.1's and Chroma's take each tensor they need
    by name (so one is missing); FLUX.2's renames each block tensor by a table of its parts
    (so the file has one that is none of them)."""
    key = str(exc.args[0])
    if layout.flux1_style:
        return f"tensor {key} is missing"
    name = next((name for name in names if f".{key}." in name), key)
    return f"unexpected tensor {name} (not a {layout.module_class})"


def _cut_linear1(checkpoint: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Cut each single block's linear1 into q, k, v and the MLP input by the model's own
    width (img_in's rows), leaving the converter zero-sized stand-ins of the width it assumes."""
    embedder = checkpoint.get("img_in.weight")
    if embedder is None:
        raise ModelLoadError(f"diffusion model {path}: tensor img_in.weight is missing")
    inner = embedder.shape[0]
    stand_in = torch.empty((3 * _CONVERTER_INNER + _CONVERTER_MLP, 0))
    cut: dict[str, torch.Tensor] = {}
    for name in [name for name in checkpoint if _SINGLE_LINEAR1.fullmatch(name)]:
        match = _SINGLE_LINEAR1.fullmatch(name)
        assert match is not None
        index, param = match.groups()
        tensor = checkpoint[name]
        mlp = tensor.shape[0] - 3 * inner
        if mlp <= 0:
            raise ModelLoadError(
                f"diffusion model {path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"too few rows for q, k and v of width {inner}"
            )
        for part, piece in zip(
            _SINGLE_PARTS, torch.split(tensor, [inner, inner, inner, mlp]), strict=True
        ):
            cut[f"single_transformer_blocks.{index}.{part}.{param}"] = piece
        checkpoint[name] = stand_in
    return cut


def _built(
    layout: _Layout,
    config: Config,
    converted: dict[str, torch.Tensor],
    dtype: torch.dtype,
    path: Path,
) -> Any:
    import diffusers
    from accelerate import init_empty_weights

    module_class = getattr(diffusers, layout.module_class)
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        # diffusers' Chroma class builds its rope through a name diffusers itself deprecates
        warnings.filterwarnings("ignore", message=_CHROMA_ROPE_WARNING, category=FutureWarning)
        module = module_class.from_config(config)
    expected = module.state_dict()
    for name, tensor in converted.items():
        if name not in expected:
            raise ModelLoadError(
                f"diffusion model {path}: unexpected tensor {name} (diffusers' name) for "
                f"a {layout.module_class}"
            )
        if value_shape(tensor) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"diffusion model {path}: tensor {name} (diffusers' name) has shape "
                f"{value_shape(tensor)}, the model's config {tuple(expected[name].shape)}"
            )
    missing = [name for name in expected if name not in converted]
    if missing:
        raise ModelLoadError(
            f"diffusion model {path}: tensor {missing[0]} (diffusers' name) is missing "
            f"({len(missing)} in all)"
        )
    use_quantized_linears(module, converted, dtype)  # a GGUF's kept blocks, where read so
    for name, tensor in converted.items():  # one at a time, where a caller mixed dtypes
        if not is_quantized(tensor):
            converted[name] = tensor.to(dtype)
    module.load_state_dict(converted, strict=True, assign=True)
    return module.eval()


def _layer_count(tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many `prefix`N. blocks there are (the highest index + 1; 0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for name in tensors if (m := pattern.match(name))]
    return max(indices, default=-1) + 1


def _transformer_shape(tensors: Mapping[str, torch.Tensor]) -> Config:
    """The fields every FLUX-layout model shares: blocks, width and heads, in/out channels."""
    layers = _layer_count(tensors, "transformer_blocks.")
    single = _layer_count(tensors, "single_transformer_blocks.")
    block = "transformer_blocks.0." if layers else "single_transformer_blocks.0."
    head_dim = tensors[f"{block}attn.norm_q.weight"].shape[0]
    inner, in_channels = tensors["x_embedder.weight"].shape
    if inner % head_dim:
        raise _Unfit(f"tensor {block}attn.norm_q.weight: head width {head_dim} divides not {inner}")
    config: Config = {
        "num_layers": layers,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "in_channels": in_channels,
        "joint_attention_dim": tensors["context_embedder.weight"].shape[1],
    }
    out_channels = tensors["proj_out.weight"].shape[0]  # patch size 1 in every one of them
    if out_channels != in_channels:  # FLUX.1 Fill and Depth take extra input channels
        config["out_channels"] = out_channels
    return config


def _flux1_config(tensors: Mapping[str, torch.Tensor]) -> Config:
    return {
        **_transformer_shape(tensors),
        "pooled_projection_dim": tensors["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        # dev has a guidance embedder (guidance distilled), schnell none
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in tensors,
    }


def _chroma_config(tensors: Mapping[str, torch.Tensor]) -> Config:
    hidden, channels = tensors["distilled_guidance_layer.in_proj.weight"].shape
    return {
        **_transformer_shape(tensors),
        "approximator_num_channels": channels,
        "approximator_hidden_dim": hidden,
        "approximator_layers": _layer_count(tensors, "distilled_guidance_layer.layers."),
    }


def _flux2_config(tensors: Mapping[str, torch.Tensor]) -> Config:
    config = _transformer_shape(tensors)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    feed = "transformer_blocks.0.ff.linear_in.weight"
    mlp = tensors[feed].shape[0] // 2  # SwiGLU: the gate and the value
    if int(inner * (mlp / inner)) != mlp:
        raise _Unfit(f"tensor {feed}: MLP width {mlp} is no ratio of the width {inner}")
    embedder = "time_guidance_embed.timestep_embedder.linear_1.weight"
    return {
        **config,
        "timestep_guidance_channels": tensors[embedder].shape[1],
        "mlp_ratio": mlp / inner,
        # FLUX.2 dev has a guidance embedder; klein (base and distilled) none
        "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in tensors,
    }


_LAYOUTS: dict[str, _Layout] = {
    "flux1": _Layout(
        "FluxTransformer2DModel",
        "convert_flux_transformer_checkpoint_to_diffusers",
        _flux1_config,
        flux1_style=True,
    ),
    "chroma": _Layout(
        "ChromaTransformer2DModel",
        "convert_chroma_transformer_checkpoint_to_diffusers",
        _chroma_config,
        flux1_style=True,
    ),
    "flux2": _Layout(
        "Flux2Transformer2DModel",
        "convert_flux2_transformer_checkpoint_to_diffusers",
        _flux2_config,
        flux1_style=False,
    ),
}
