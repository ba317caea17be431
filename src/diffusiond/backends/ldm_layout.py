"""Diffusers state dicts renamed to the original CompVis/ldm single-file key layout.

The inverse of diffusers' single-file conversion, for Stable Diffusion 1.x-shaped pipelines
(a CLIP text encoder under `cond_stage_model.transformer.`): the layout most downloaded
checkpoints take. The benchmark and the tests use it to make single-file checkpoints of
models built here; the server only reads that layout (through diffusers' own conversion).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _unet_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is a resnet) for every block of a UNet."""
    levels = len(config["block_out_channels"])
    per_level = int(config["layers_per_block"])
    prefixes: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    for level in range(levels):
        for layer in range(per_level):
            block = 1 + level * (per_level + 1) + layer
            prefixes.append(
                (f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{block}.0.", True)
            )
            prefixes.append(
                (f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{block}.1.", False)
            )
        block = (level + 1) * (per_level + 1)
        prefixes.append(
            (f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", False)
        )
        has_attention = str(config["up_block_types"][level]).startswith("CrossAttn")
        for layer in range(per_level + 1):
            block = level * (per_level + 1) + layer
            prefixes.append(
                (f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{block}.0.", True)
            )
            prefixes.append(
                (f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{block}.1.", False)
            )
        block = level * (per_level + 1) + per_level
        upsampler = f"output_blocks.{block}.{2 if has_attention else 1}.conv."
        prefixes.append((f"up_blocks.{level}.upsamplers.0.conv.", upsampler, False))
    return prefixes


def _rename(
    key: str, prefixes: list[tuple[str, str, bool]], inner: tuple[tuple[str, str], ...]
) -> str:
    for old, new, is_resnet in prefixes:
        if key.startswith(old):
            rest = key[len(old) :]
            if is_resnet:
                for inner_old, inner_new in inner:
                    if rest.startswith(inner_old):
                        rest = inner_new + rest[len(inner_old) :]
                        break
            return new + rest
    raise KeyError(f"no ldm name for the diffusers key {key!r}")


def unet_to_ldm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    return {UNET_PREFIX + _rename(key, prefixes, _UNET_RESNET): t for key, t in state.items()}


def _vae_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    levels = len(config["block_out_channels"])
    prefixes: list[tuple[str, str, bool]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", False),
        ("decoder.conv_norm_out.", "decoder.norm_out.", False),
    ]
    for part in ("encoder", "decoder"):
        for index in range(2):
            prefixes.append(
                (f"{part}.mid_block.resnets.{index}.", f"{part}.mid.block_{index + 1}.", True)
            )
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", False))
    for level in range(levels):
        up = levels - 1 - level
        prefixes += [
            (f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", True),
            (
                f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                f"encoder.down.{level}.downsample.conv.",
                False,
            ),
            (f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{up}.block.", True),
            (
                f"decoder.up_blocks.{level}.upsamplers.0.conv.",
                f"decoder.up.{up}.upsample.conv.",
                False,
            ),
        ]
    return prefixes


def vae_to_ldm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefixes(config)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_", "decoder.conv_")):
            new_key = key if "conv_norm_out" not in key else _rename(key, prefixes, ())
        elif ".mid_block.attentions.0." in key:
            new_key = _rename(key, prefixes, ())
            head, _, rest = new_key.rpartition("attn_1.")
            new_key = (
                head + "attn_1." + _rename(rest, [(o, n, False) for o, n in _VAE_ATTENTION], ())
            )
            if tensor.dim() == 2:  # linear in diffusers, 1x1 convolution in ldm
                converted[VAE_PREFIX + new_key] = tensor[:, :, None, None].contiguous()
                continue
        else:
            # resnets: ldm keeps diffusers' names inside, but calls the shortcut nin_shortcut
            new_key = _rename(key, prefixes, ()).replace("conv_shortcut.", "nin_shortcut.")
        converted[VAE_PREFIX + new_key] = tensor.contiguous()
    return converted


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's weights under the SD 1.x text-encoder prefix."""
    return {
        CLIP_PREFIX + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")
    }


def pipeline_to_ldm(pipeline: Any) -> dict[str, torch.Tensor]:
    """One state dict in the ldm layout for an SD 1.x-shaped diffusers pipeline."""
    return {
        **unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config),
        **vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config),
        **clip_to_ldm(pipeline.text_encoder.state_dict()),
    }
