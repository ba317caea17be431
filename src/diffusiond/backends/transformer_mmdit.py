"""The diffusion models of SD 3.x, Z-Image and Qwen-Image from a component file's tensors.

A user downloads these in their original names: Stability's `sd3.5_medium`/`sd3.5_large`
(`joint_blocks.N.x_block.attn.qkv.weight`, SD 3.5 medium's dual attention `attn2` and the
`ln_q`/`ln_k` qk norms), Tongyi's Z-Image (`layers.N.attention.qkv.weight`,
`noise_refiner`, `context_refiner`, `cap_embedder`, `x_pad_token`), Qwen's Qwen-Image as
ComfyUI ships it (already diffusers' names), each perhaps under ComfyUI's
`model.diffusion_model.` prefix and perhaps as a city96 GGUF with the same names. A
checkpoint that also holds other parts (Stability's files carry the VAE as
`first_stage_model.*`) keeps only the prefixed diffusion model's tensors.

diffusers' own single-file converter renames them; the module's config is read from the
converted tensors' shapes. What no tensor records (the rope axes and theta, SD3's
`sample_size`, Qwen-Image's patch size and guidance flag) is the class default, which is
the published models' value. The module is built on the meta device and the tensors
assigned to it as they are (no float32 detour, no second copy; the caller's dict is
emptied as they are taken): they must match its parameters and buffers name for name and
shape for shape, or a ModelLoadError names the file and the first tensor at fault.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends.components import COMFY_PREFIX, detect_family
from diffusiond.backends.families import FAMILIES
from diffusiond.backends.gguf_weights import use_quantized_linears, value_shape
from diffusiond.errors import ModelLoadError

_CLASSES = {
    "sd3": "SD3Transformer2DModel",
    "zimage": "ZImageTransformer2DModel",
    "qwenimage": "QwenImageTransformer2DModel",
}
_CONVERSION_ERRORS = (IndexError, ValueError)  # odd block numbers, no blocks


class _Tensors:
    """A converted state dict with the file it came from, for shape look-ups that fail
    with a ModelLoadError naming the file and the tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor], family: str, path: Path) -> None:
        self.tensors = tensors
        self.family = family
        self.path = path

    def shape(self, name: str) -> tuple[int, ...]:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise self.error(f"tensor {self.named(name)} is missing")
        return value_shape(tensor)  # a GGUF's kept blocks: the values' shape

    def named(self, name: str) -> str:
        """A converted tensor's name for a message (Qwen-Image's are the file's own)."""
        return name if self.family == "qwenimage" else f"{name} (diffusers' name)"

    def has(self, name: str) -> bool:
        return name in self.tensors

    def indexes(self, prefix: str) -> list[int]:
        """The block numbers N of the tensors named `prefix`N.*, sorted."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for name in self.tensors if (m := pattern.match(name))}
        return sorted(found)

    def count(self, prefix: str) -> int:
        """How many blocks `prefix`N there are; a gap in the numbers is a missing block."""
        found = self.indexes(prefix)
        gap = next((index for index, number in enumerate(found) if index != number), None)
        if gap is not None:
            raise self.error(f"the tensors of block {prefix}{gap} are missing")
        return len(found)

    def heads(self, width: int, head_dim: int, what: str) -> int:
        if head_dim <= 0 or width % head_dim:
            raise self.error(f"{what} width {width} is not a whole number of {head_dim}-wide heads")
        return width // head_dim

    def error(self, what: str) -> ModelLoadError:
        title = FAMILIES[self.family].title
        return ModelLoadError(f"diffusion model {self.path} ({title}): {what}")


def load_mmdit_layout(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    """The family's transformer ("sd3", "zimage" or "qwenimage") from `state_dict` (read
    from `path`, in its original names), in `dtype`. The tensors are taken out of
    `state_dict`, which is left empty, so that no tensor is held twice."""
    if family not in _CLASSES:
        raise ValueError(f"{family!r} is not a family of this layout ({', '.join(_CLASSES)})")
    original = _diffusion_tensors(state_dict)
    _check_family(family, original, path)
    tensors = _Tensors(_CONVERTERS[family](original, family, path), family, path)
    config = _CONFIG_READERS[family](tensors)
    return _build(family, config, tensors, dtype)


def _diffusion_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusion model's tensors, ComfyUI's prefix dropped; in a file that has the
    prefix, the tensors without it are other parts of a whole checkpoint and are left."""
    prefixed = any(name.startswith(COMFY_PREFIX) for name in state_dict)
    out: dict[str, torch.Tensor] = {}
    for name in list(state_dict):
        tensor = state_dict.pop(name)
        if name.startswith(COMFY_PREFIX):
            out[name[len(COMFY_PREFIX) :]] = tensor
        elif not prefixed:
            out[name] = tensor
    return out


def _check_family(family: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    found = detect_family(tensors)
    if found == family:
        return
    title = FAMILIES[family].title
    looks = f"it looks like {FAMILIES[found].title}" if found else "no family's tensors are in it"
    raise ModelLoadError(f"{path} is not a {title} diffusion model: {looks}")


def _convert_sd3(tensors: dict[str, torch.Tensor], family: str, path: Path) -> dict[str, Any]:
    """Stability's names to diffusers'. The converter pops each tensor it maps and fails on
    a missing one with a KeyError; what it leaves is no part of the model."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    error = _Tensors(tensors, family, path).error
    try:
        converted: dict[str, Any] = convert_sd3_transformer_checkpoint_to_diffusers(tensors)
    except KeyError as exc:
        raise error(f"tensor {exc.args[0]} is missing") from None
    except _CONVERSION_ERRORS as exc:
        raise error(f"its tensors cannot be converted: {exc}") from None
    if tensors:
        raise error(f"tensor {sorted(tensors)[0]} is no part of the model")
    return converted


def _convert_zimage(tensors: dict[str, torch.Tensor], family: str, path: Path) -> dict[str, Any]:
    """Tongyi's names to diffusers' (a file already in diffusers' names is kept as it is:
    the converter's renames would apply twice)."""
    from diffusers.loaders.single_file_utils import (
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    del family, path  # it renames and splits only: nothing in it can fail
    if any(name.startswith("all_x_embedder.") for name in tensors):
        return tensors
    converted: dict[str, Any] = convert_z_image_transformer_checkpoint_to_diffusers(tensors)
    return converted


def _same_names(tensors: dict[str, torch.Tensor], family: str, path: Path) -> dict[str, Any]:
    """Qwen-Image's files are in diffusers' names already (its single-file mapping is the
    identity)."""
    del family, path
    return dict(tensors)


def _default(family: str, argument: str) -> Any:
    """The class's default for a config value no tensor records."""
    return inspect.signature(_module_class(family).__init__).parameters[argument].default


def _sd3_config(t: _Tensors) -> dict[str, Any]:
    inner, in_channels, patch, _ = t.shape("pos_embed.proj.weight")
    positions = t.shape("pos_embed.pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise t.error(f"pos_embed holds {positions} positions, not a square grid")
    qk_norm = t.has("transformer_blocks.0.attn.norm_q.weight")
    head_dim = (
        t.shape("transformer_blocks.0.attn.norm_q.weight")[0]
        if qk_norm
        else _default("sd3", "attention_head_dim")
    )
    caption_dim, joint_dim = t.shape("context_embedder.weight")
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": t.shape("proj_out.weight")[0] // (patch * patch),
        "num_layers": t.count("transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": t.heads(inner, head_dim, "the model"),
        "joint_attention_dim": joint_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": t.shape("time_text_embed.text_embedder.linear_1.weight")[1],
        "pos_embed_max_size": side,
        "dual_attention_layers": tuple(
            index
            for index in t.indexes("transformer_blocks.")
            if t.has(f"transformer_blocks.{index}.attn2.to_q.weight")
        ),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def _zimage_config(t: _Tensors) -> dict[str, Any]:
    pattern = re.compile(r"all_x_embedder\.(\d+)-(\d+)\.weight")
    patches = sorted(
        (int(m.group(1)), int(m.group(2))) for name in t.tensors if (m := pattern.fullmatch(name))
    )
    if not patches:
        raise t.error("tensor x_embedder.weight is missing")
    patch, frames = patches[0]
    dim, features = t.shape(f"all_x_embedder.{patch}-{frames}.weight")
    qk_norm = t.has("layers.0.attention.norm_q.weight")
    head_dim = (
        t.shape("layers.0.attention.norm_q.weight")[0]
        if qk_norm
        else sum(_default("zimage", "axes_dims"))
    )
    config: dict[str, Any] = {
        "all_patch_size": tuple(p for p, _ in patches),
        "all_f_patch_size": tuple(f for _, f in patches),
        "in_channels": features // (patch * patch * frames),
        "dim": dim,
        "n_layers": t.count("layers."),
        "n_refiner_layers": t.count("noise_refiner."),
        "n_heads": t.heads(dim, head_dim, "the model"),
        "n_kv_heads": t.heads(t.shape("layers.0.attention.to_k.weight")[0], head_dim, "k"),
        "qk_norm": qk_norm,
        "cap_feat_dim": t.shape("cap_embedder.1.weight")[1],
    }
    if t.has("siglip_embedder.1.weight"):  # Z-Image Omni
        config["siglip_feat_dim"] = t.shape("siglip_embedder.1.weight")[1]
    return config


def _qwenimage_config(t: _Tensors) -> dict[str, Any]:
    inner, in_channels = t.shape("img_in.weight")
    head_dim = t.shape("transformer_blocks.0.attn.norm_q.weight")[0]
    patch = _default("qwenimage", "patch_size")
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": t.shape("proj_out.weight")[0] // (patch * patch),
        "num_layers": t.count("transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": t.heads(inner, head_dim, "the model"),
        "joint_attention_dim": t.shape("txt_in.weight")[1],
        "use_additional_t_cond": t.has("time_text_embed.addition_t_embedding.weight"),
    }


_CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], str, Path], dict[str, Any]]] = {
    "sd3": _convert_sd3,
    "zimage": _convert_zimage,
    "qwenimage": _same_names,
}
_CONFIG_READERS: dict[str, Callable[[_Tensors], dict[str, Any]]] = {
    "sd3": _sd3_config,
    "zimage": _zimage_config,
    "qwenimage": _qwenimage_config,
}


def _module_class(family: str) -> Any:
    import diffusers

    return getattr(diffusers, _CLASSES[family])


def _empty_module(family: str, config: dict[str, Any]) -> Any:
    """The module with nothing allocated that the file holds. SD3's and Z-Image's __init__
    make nothing else, so they are built wholly on the meta device (SD3's positional table,
    in the file too, would otherwise be computed: 3.4 GB and 12 s for SD 3.5 medium).
    Qwen-Image's __init__ computes its rope table as a plain tensor, which must be real, so
    there only the parameters are on the meta device."""
    from accelerate import init_empty_weights

    if family == "qwenimage":
        with init_empty_weights(include_buffers=False):
            return _module_class(family)(**config)
    with torch.device("meta"):
        return _module_class(family)(**config)


def _build(family: str, config: dict[str, Any], t: _Tensors, dtype: torch.dtype) -> Any:
    """The empty module, then the tensors assigned to it as its parameters and buffers."""
    try:
        module = _empty_module(family, config)
    except (AssertionError, ValueError, TypeError) as exc:  # the classes assert their shapes
        raise t.error(f"no model has these tensors' shapes ({config}): {exc}") from None
    _check_tensors(module.state_dict(), t)
    use_quantized_linears(module, t.tensors, dtype)  # a GGUF's kept blocks, where read so
    for name, tensor in t.tensors.items():  # a no-op (no copy) for tensors already in dtype
        if tensor.is_floating_point():
            t.tensors[name] = tensor.to(dtype)
    module.load_state_dict(t.tensors, strict=True, assign=True)
    t.tensors.clear()
    left = [name for name, tensor in _module_tensors(module) if tensor.is_meta]
    if left:
        raise t.error(f"tensor {left[0]} was not loaded")
    return module.eval()


def _check_tensors(expected: dict[str, torch.Tensor], t: _Tensors) -> None:
    missing = [name for name in expected if name not in t.tensors]
    if missing:
        raise t.error(f"tensor {t.named(missing[0])} is missing")
    unexpected = [name for name in t.tensors if name not in expected]
    if unexpected:
        raise t.error(f"tensor {t.named(unexpected[0])} is no part of the model")
    for name, want in expected.items():
        got = value_shape(t.tensors[name])
        if got != tuple(want.shape):
            raise t.error(
                f"tensor {t.named(name)} has shape {got}, "
                f"not {tuple(want.shape)} as the others' shapes imply"
            )


def _module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]
