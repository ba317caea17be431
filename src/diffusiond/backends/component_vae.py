"""A flow family's VAE from its component file, in the layout its release has.

- FLUX.1, Chroma and Z-Image share FLUX.1's `ae.safetensors`, SD 3.x has the same kind: the
  original autoencoder's (ldm) names (`encoder.down.0.block.0.norm1.weight`), converted by
  diffusers' `convert_ldm_vae_checkpoint` into an `AutoencoderKL` without quant convs.
- FLUX.2's `ae.safetensors` is that layout too, with its quant convs inside the encoder and
  the decoder and a batch norm (`bn.running_mean`) over the 2x2-patched latents: an
  `AutoencoderKLFlux2`. diffusers 0.42 has no single-file converter for it (its own script
  does the renaming), so those four names are moved here and the rest is FLUX.1's.
- Qwen-Image's VAE (ComfyUI's `qwen_image_vae.safetensors`) is the Wan 2.1 VAE's layout;
  diffusers' `convert_wan_vae_to_diffusers` assumes Wan's two residual blocks a level, so
  the renaming to `AutoencoderKLQwenImage`'s names is done here for any count.
- A file already in diffusers names (a diffusers folder's `vae/` weights) is told apart by
  its keys and taken as it is.

The config comes from the tensors' shapes. What no tensor records is the published value:
the latent scaling of each family, Qwen-Image's per-channel latent statistics (diffusers'
own defaults for `AutoencoderKLQwenImage`, the published ones), and the group norms' group
count, 32 as published, or where a width is not a multiple of 32 the largest power of two
dividing them all (a tiny test model's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends.component_weights import assign, build_on_meta, check_tensors
from diffusiond.errors import ModelLoadError

# (scaling_factor, shift_factor) of each AutoencoderKL family's published VAE config.
_LATENT_SCALING = {
    "flux1": (0.3611, 0.1159),
    "chroma": (0.3611, 0.1159),
    "zimage": (0.3611, 0.1159),
    "sd3": (1.5305, 0.0609),
}
_PUBLISHED_GROUPS = 32
_SAMPLE_SIZE = 1024  # the published configs' (it only sets the tile size)
# Where a released file might keep its VAE under a prefix (a whole checkpoint's, ComfyUI's).
_PREFIXES = ("first_stage_model.", "vae.", "model.")


def load_vae(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    """The family's VAE module from `state_dict` (read from `path` in `dtype`)."""
    what = f"vae {path}"
    state = _without_prefix(state_dict)
    if not state:
        raise ModelLoadError(f"{what}: the file holds no tensors")
    if family == "qwenimage":
        return _qwen_image_vae(state, what)
    if family == "flux2" or family in _LATENT_SCALING:
        return _kl_vae(family, state, what)
    raise ModelLoadError(f"{what}: no VAE layout is known for family {family!r}")


def _without_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if any(name.startswith(prefix + "encoder.") for name in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _kl_vae(family: str, state: dict[str, torch.Tensor], what: str) -> Any:
    if "encoder.down.0.block.0.conv1.weight" in state:
        state = _from_ldm(state, what)
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" not in state:
        raise ModelLoadError(
            f"{what}: not an autoencoder in the original (encoder.down.*) or diffusers "
            f"(encoder.down_blocks.*) names, as {family}'s VAE is"
        )
    config = _kl_config(state, what)
    if family == "flux2":
        from diffusers import AutoencoderKLFlux2

        if "bn.running_mean" not in state:
            raise ModelLoadError(f"{what}: FLUX.2's VAE has a batch norm (bn.*), this file none")
        state.setdefault("bn.num_batches_tracked", torch.tensor(0))
        side = math.isqrt(state["bn.running_mean"].shape[0] // config["latent_channels"])
        module = build_on_meta(lambda: AutoencoderKLFlux2(**config, patch_size=(side, side)))
    else:
        from diffusers import AutoencoderKL

        if "bn.running_mean" in state:
            raise ModelLoadError(f"{what}: a FLUX.2 VAE (it has a batch norm), not {family}'s")
        scaling, shift = _LATENT_SCALING[family]
        module = build_on_meta(
            lambda: AutoencoderKL(**config, scaling_factor=scaling, shift_factor=shift)
        )
    check_tensors(module, state, what)
    assign(module, state, what)
    return module


def _levels(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m[1]) for name in state if (m := re.match(pattern, name))}
    return max(found) + 1 if found else 0


def _from_ldm(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    moved = {}
    for old, new in (
        ("encoder.quant_conv.", "quant_conv."),
        ("decoder.post_quant_conv.", "post_quant_conv."),
    ):
        for name in [name for name in state if name.startswith(old)]:
            moved[new + name[len(old) :]] = state.pop(name)
    batch_norm = {name: state.pop(name) for name in list(state) if name.startswith("bn.")}
    levels = _levels(state, r"encoder\.down\.(\d+)\.")
    try:
        converted: dict[str, torch.Tensor] = convert_ldm_vae_checkpoint(
            {**state, **moved},
            {"down_block_types": [None] * levels, "up_block_types": [None] * levels},
        )
    except (KeyError, IndexError, AttributeError) as exc:
        raise ModelLoadError(f"{what}: its autoencoder tensors are incomplete ({exc})") from None
    # diffusers' converter passes over names it does not know: such a tensor is refused here
    kept = {tensor.data_ptr() for tensor in converted.values()}
    dropped = sorted(
        name for name, tensor in {**state, **moved}.items() if tensor.data_ptr() not in kept
    )
    if dropped:
        raise ModelLoadError(
            f"{what}: {len(dropped)} tensors the autoencoder has no place for "
            f"({', '.join(dropped[:3])}); is it another model's file?"
        )
    return {**converted, **batch_norm}


def _kl_config(state: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    def shape(name: str) -> tuple[int, ...]:
        if name not in state:
            raise ModelLoadError(f"{what}: tensor {name} missing")
        return tuple(state[name].shape)

    levels = _levels(state, r"encoder\.down_blocks\.(\d+)\.")
    widths = [shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)]
    decoder = [shape(f"decoder.up_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)]
    layers = _levels(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    config: dict[str, Any] = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(widths),
        "layers_per_block": layers,
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": math.gcd(_PUBLISHED_GROUPS, *widths, *decoder),
        "sample_size": _SAMPLE_SIZE,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
    }
    if tuple(reversed(decoder)) != tuple(widths):
        config["decoder_block_out_channels"] = tuple(reversed(decoder))
    return config


# ---- Qwen-Image (the Wan 2.1 VAE) ------------------------------------------------------

_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.": "conv1.",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_QWEN_LATENTS = 16  # the published latents_mean/latents_std (diffusers' defaults) are 16 long
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_ENDS = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}


def _residual(rest: str) -> str:
    for old, new in _RESIDUAL.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _from_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Wan 2.1 VAE's names as AutoencoderKLQwenImage has them. The encoder's levels are
    one flat list in both; the decoder's flat list (each level's residual blocks, then its
    upsampler) becomes up_blocks[level].resnets / .upsamplers."""
    ups = sorted({int(m[1]) for n in state if (m := re.match(r"decoder\.upsamples\.(\d+)\.", n))})
    place: dict[int, str] = {}
    level = resnet = 0
    for index in ups:
        if any(n.startswith(f"decoder.upsamples.{index}.resample.") for n in state):
            place[index] = f"up_blocks.{level}.upsamplers.0."
            level, resnet = level + 1, 0
        else:
            place[index] = f"up_blocks.{level}.resnets.{resnet}."
            resnet += 1
    out = {}
    for name, tensor in state.items():
        out[_wan_name(name, place)] = tensor
    return out


def _wan_name(name: str, place: Mapping[int, str]) -> str:
    for old, new in _TOP.items():
        if name.startswith(old):
            return new + name[len(old) :]
    side, _, rest = name.partition(".")
    for old, new in _ENDS.items():
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old) :]}"
    return f"{side}.{_wan_block(rest, place)}"


def _wan_block(rest: str, place: Mapping[int, str]) -> str:
    """An encoder's or decoder's block name, below `encoder.`/`decoder.`."""
    if match := re.match(r"middle\.(\d+)\.(.*)", rest):
        index, tail = int(match[1]), match[2]
        if index % 2:
            return f"mid_block.attentions.{index // 2}.{tail}"
        return f"mid_block.resnets.{index // 2}.{_residual(tail)}"
    if match := re.match(r"downsamples\.(\d+)\.(.*)", rest):
        return f"down_blocks.{match[1]}.{_residual(match[2])}"
    if match := re.match(r"upsamples\.(\d+)\.(.*)", rest):
        target = place.get(int(match[1]))
        if target is None:  # not the decoder's: left as it is, then refused as unexpected
            return rest
        tail = match[2] if "upsamplers" in target else _residual(match[2])
        return f"{target}{tail}"
    return rest


def _qwen_image_vae(state: dict[str, torch.Tensor], what: str) -> Any:
    from diffusers import AutoencoderKLQwenImage

    if "encoder.conv1.weight" in state and "decoder.upsamples.0.residual.0.gamma" in state:
        state = _from_wan(state)
    elif (
        "encoder.conv_in.weight" not in state
        or "decoder.up_blocks.0.resnets.0.norm1.gamma" not in state
    ):
        raise ModelLoadError(
            f"{what}: not a Qwen-Image VAE in the Wan 2.1 (encoder.conv1, decoder.upsamples.*) "
            "or diffusers (encoder.conv_in, decoder.up_blocks.*) names"
        )
    config = _qwen_config(state, what)
    module = build_on_meta(lambda: AutoencoderKLQwenImage(**config))
    check_tensors(module, state, what)
    assign(module, state, what)
    return module


def _qwen_config(state: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    """base_dim, z_dim, dim_mult, num_res_blocks and the temporal downsampling from the
    encoder's flat list: residual blocks, with a resample closing each level but the last."""
    base = int(state["encoder.conv_in.weight"].shape[0])
    entries = sorted(
        {int(m[1]) for n in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))}
    )
    widths: list[int] = []
    temporal: list[bool] = []
    blocks: list[int] = [0]
    for index in entries:
        prefix = f"encoder.down_blocks.{index}."
        if prefix + "resample.1.weight" in state:
            temporal.append(prefix + "time_conv.weight" in state)
            blocks.append(0)
        elif prefix + "conv2.weight" in state:
            if blocks[-1] == 0:
                widths.append(int(state[prefix + "conv2.weight"].shape[0]))
            blocks[-1] += 1
        else:
            raise ModelLoadError(
                f"{what}: encoder entry {index} is neither a residual block nor a resample"
            )
    if len(set(blocks)) != 1 or not widths or any(width % base for width in widths):
        raise ModelLoadError(
            f"{what}: the encoder's levels are not of one shape ({blocks} residual blocks)"
        )
    if "post_quant_conv.weight" not in state:
        raise ModelLoadError(f"{what}: tensor post_quant_conv.weight (conv2.weight) missing")
    z_dim = int(state["post_quant_conv.weight"].shape[0])
    if z_dim != _QWEN_LATENTS:
        raise ModelLoadError(
            f"{what}: {z_dim} latent channels; Qwen-Image's VAE has {_QWEN_LATENTS} "
            "(is it a Wan 2.2 VAE?)"
        )
    return {
        "base_dim": base,
        "z_dim": z_dim,
        "dim_mult": [width // base for width in widths],
        "num_res_blocks": blocks[0],
        "temperal_downsample": temporal,
    }
