"""Component files of the tiny models' VAEs and text encoders, in their published layouts.

What the split-component loaders (component_encoders.py) read: a VAE as its family's own
release names it (FLUX.1's and SD3's ldm names, FLUX.2's with its batch norm, Qwen-Image's
Wan 2.1 names), or in diffusers names; a text encoder as Hugging Face names it in a
.safetensors, or as llama.cpp writes it in a .gguf (its names from the `gguf` package's own
table, its config and its tokenizer in the metadata); a tokenizer folder per role.

The tiny text encoders these are tested with are in encoder_models.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL = 1, 2, 3


# ---- VAEs -------------------------------------------------------------------------------


def _ldm_attention(name: str) -> str:
    for new, old in (
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ):
        name = name.replace(new, old)
    return name


def _ldm_name(name: str, levels: int) -> str:
    """A diffusers AutoencoderKL name as the original (ldm) autoencoder spells it."""
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    name = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
    if "mid_block.attentions.0." in name:
        return _ldm_attention(name.replace("mid_block.attentions.0.", "mid.attn_1."))
    name = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", name)
    name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
    name = re.sub(
        r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", name
    )
    return re.sub(
        r"up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"up.{levels - 1 - int(m[1])}.upsample.",
        name,
    )


def ldm_vae_state(module: Any) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's (or FLUX.2's) weights in the original autoencoder's names."""
    levels = len(module.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        if name.startswith("quant_conv."):
            out["encoder." + name] = tensor  # where FLUX.2's release keeps them
            continue
        if name.startswith("post_quant_conv."):
            out["decoder." + name] = tensor
            continue
        new = _ldm_name(name, levels)
        conv = "attn_1." in new and new.endswith(".weight") and tensor.ndim == 2
        out[new] = tensor[:, :, None, None] if conv else tensor  # the original's 1x1 convs
    return out


_WAN_RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1": "residual.2",
    "norm2.gamma": "residual.3.gamma",
}
_WAN_RESIDUAL |= {"conv2": "residual.6", "conv_shortcut": "shortcut"}


def _wan_residual(rest: str) -> str:
    for new, old in _WAN_RESIDUAL.items():
        if rest.startswith(new):
            return old + rest[len(new) :]
    return rest


def wan_vae_state(module: Any) -> dict[str, torch.Tensor]:
    """A Qwen-Image VAE's weights in the Wan 2.1 VAE's original names (ComfyUI's file)."""
    per_level = module.config.num_res_blocks + 1
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        out[_wan_name(name, per_level)] = tensor
    return out


def _wan_name(name: str, per_level: int) -> str:
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for new, old in fixed.items():
        if name.startswith(new):
            return old + name[len(new) :]
    side, rest = name.split(".", 1)
    for new, old in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new) :]}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
    if match:
        kind, index, tail = match.groups()
        position = 1 if kind == "attentions" else 2 * int(index)
        tail = tail if kind == "attentions" else _wan_residual(tail)
        return f"{side}.middle.{position}.{tail}"
    match = re.match(r"down_blocks\.(\d+)\.(.*)", rest)
    if match:
        return f"{side}.downsamples.{match[1]}.{_wan_residual(match[2])}"
    match = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", rest)
    assert match, name
    level, _, resnet, tail = match.groups()
    start = int(level) * (per_level + 1)
    if resnet is None:
        return f"{side}.upsamples.{start + per_level}.{tail}"
    return f"{side}.upsamples.{start + int(resnet)}.{_wan_residual(tail)}"


def write_vae(path: Path, family: str, module: Any, *, layout: str = "original") -> Path:
    """`module` (a diffusers VAE) saved as `family`'s released VAE file ("original") or in
    diffusers names ("diffusers"); a .gguf path is written as sd.cpp would (F32)."""
    if layout == "diffusers":
        state = dict(module.state_dict())
    elif family == "qwenimage":
        state = wan_vae_state(module)
    else:
        state = ldm_vae_state(module)
    state.pop("bn.num_batches_tracked", None)  # FLUX.2's release has no such counter
    return _write_tensors(path, state)


def _write_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    if path.suffix == ".gguf":
        from gguf import GGUFWriter

        writer = GGUFWriter(str(path), arch="unused")
        writer.kv_data[0].pop("general.architecture")
        for name, tensor in state.items():
            writer.add_tensor(name, tensor.detach().float().numpy())
        _finish(writer)
    else:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- text encoders ------------------------------------------------------------------------

_GGUF_ARCH = {"t5xxl": "T5ENCODER", "llm": "QWEN3"}


def write_text_encoder(
    path: Path,
    role: str,
    module: Any,
    fmt: str,
    tokenizer: Any = None,
    *,
    prefix: str = "",
    open_clip: bool = False,
    quantized: bool = False,
) -> Path:
    """A text encoder's file: its Hugging Face names (under `prefix`; a CLIP in OpenCLIP's
    original names if `open_clip`) in a .safetensors, or llama.cpp's layout in a .gguf with
    its config and (given one) its tokenizer in the metadata, its matrices Q8_0 where
    `quantized` (and their rows are whole blocks). `path` gets the format's suffix."""
    path = path.with_suffix("." + fmt)
    if fmt == "safetensors":
        state = dict(module.state_dict())
        if role.startswith("clip") and "embeddings.token_embedding.weight" in state:
            state = {"text_model." + k: v for k, v in state.items()}  # the hub's names
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        if open_clip:
            state = open_clip_state(state)
        state = {prefix + k: v for k, v in state.items()}
        return _write_tensors(path, _untied(state))
    return _write_gguf(path, role, module, tokenizer, quantized)


_OPEN_CLIP_PARTS = (
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.out_proj.", ".attn.out_proj."),
)
_OPEN_CLIP_ENDS = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _open_clip_name(name: str) -> str:
    for new, old in _OPEN_CLIP_PARTS:
        name = name.replace(new, old)
    return name


def open_clip_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's hub names as OpenCLIP's own text tower has them (SDXL's bigG)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif name in _OPEN_CLIP_ENDS:
            out[_OPEN_CLIP_ENDS[name]] = tensor
        elif match := re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", name):
            fused.setdefault(f"{match[1]}.in_proj_{match[3]}", {})[match[2]] = tensor
        else:
            out[_open_clip_name(name)] = tensor
    for name, parts in fused.items():
        target = name.replace("text_model.encoder.layers.", "transformer.resblocks.")
        out[target.replace(".in_proj", ".attn.in_proj")] = torch.cat([parts[k] for k in "qkv"])
    return out


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied tensors stored once, as a released file does (safetensors refuses shared memory)."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in state.items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            continue
        seen[pointer] = name
        out[name] = tensor
    return out


def _gguf_values(tensor: torch.Tensor, quantized: bool) -> tuple[Any, Any]:
    """(values, raw type) for GGUFWriter: Q8_0 bytes for a matrix when asked, else F32."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    values = tensor.detach().float().numpy()
    block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
    if quantized and values.ndim == 2 and values.shape[-1] % block == 0:
        return quantize(values, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return values, None


def _write_gguf(path: Path, role: str, module: Any, tokenizer: Any, quantized: bool) -> Path:
    import gguf

    arch = getattr(gguf.MODEL_ARCH, _GGUF_ARCH[role])
    config = module.config
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[arch])
    layers = config.num_layers if role == "t5xxl" else config.num_hidden_layers
    names = gguf.TensorNameMap(arch, layers)
    written = set()
    for name, tensor in _untied(dict(module.state_dict())).items():
        hf_name = (
            name if role == "t5xxl" or name.startswith(("model.", "lm_head")) else "model." + name
        )
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if gguf_name not in written:
            written.add(gguf_name)
            values, raw_type = _gguf_values(tensor, quantized)
            writer.add_tensor(gguf_name, values, raw_dtype=raw_type)
    if role == "t5xxl":
        _t5_metadata(writer, config)
    else:
        _qwen3_metadata(writer, config)
    if tokenizer is not None:
        (_unigram_tokenizer if role == "t5xxl" else _bpe_tokenizer)(writer, tokenizer)
    _finish(writer)
    return path


def _t5_metadata(writer: Any, config: Any) -> None:
    writer.add_context_length(512)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_key_length(config.d_kv)
    writer.add_value_length(config.d_kv)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
    writer.add_decoder_start_token_id(config.decoder_start_token_id)


def _qwen3_metadata(writer: Any, config: Any) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 0))))


def _backend_model(tokenizer: Any) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return model


def _unigram_tokenizer(writer: Any, tokenizer: Any) -> None:
    """A sentencepiece unigram vocabulary as llama.cpp keeps T5's."""
    pieces = _backend_model(tokenizer)["vocab"]
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    writer.add_tokenizer_model("t5")
    writer.add_token_list([piece for piece, _ in pieces])
    writer.add_token_scores([float(score) for _, score in pieces])
    kinds = [
        _TOKEN_CONTROL
        if index in special
        else _TOKEN_UNKNOWN
        if index == tokenizer.unk_token_id
        else _TOKEN_NORMAL
        for index in range(len(pieces))
    ]
    writer.add_token_types(kinds)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_eos_token(True)


def _bpe_tokenizer(writer: Any, tokenizer: Any) -> None:
    """A byte-level BPE vocabulary (Qwen's) with its merges, specials and chat template."""
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = set(tokenizer.all_special_tokens) | {
        added.content for added in tokenizer.added_tokens_decoder.values() if added.special
    }
    merges = [
        " ".join(pair) if isinstance(pair, list) else pair
        for pair in _backend_model(tokenizer)["merges"]
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([_TOKEN_CONTROL if t in specials else _TOKEN_NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[tokenizer.eos_token or "<|endoftext|>"])
    writer.add_pad_token_id(vocab[tokenizer.pad_token or "<|endoftext|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_tokenizer_folder(folder: Path, role: str, tokenizer: Any) -> Path:
    """`folder/role/`: the tokenizer saved as a Hugging Face tokenizer folder."""
    target = folder / role
    tokenizer.save_pretrained(str(target))
    return target
