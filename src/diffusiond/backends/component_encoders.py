"""A family's VAE and text encoders (with their tokenizers) from component files.

The VAE is component_vae.py's. A text encoder is built by its role, in the class the
family's pipeline takes: clip_l a `CLIPTextModel` (FLUX.1) or, with its projection, a
`CLIPTextModelWithProjection` (SD 3.x), clip_g the latter, t5xxl a `T5EncoderModel`, llm a
`Qwen3ForCausalLM` (FLUX.2 klein reads its hidden states), a `Qwen3Model` (Z-Image) or a
`Qwen2_5_VLForConditionalGeneration` (Qwen-Image). Its config is read from the tensors'
shapes (component_text.py) and the module takes the file's tensors in the compute dtype.

Files: a .safetensors in Hugging Face names (under any prefix: ComfyUI's, a checkpoint's),
CLIP-G also in OpenCLIP's original names; a .gguf for t5xxl and a Qwen3 llm in llama.cpp's
layout, read tensor by tensor with our own reader (transformers' GGUF loader would hold the
whole model in float32 first). A Qwen2.5-VL GGUF is refused: llama.cpp keeps its vision
tower in a separate mmproj file, and the pipeline's class needs both.

Tokenizers, first found wins: `tokenizers/<role>/` (a Hugging Face tokenizer folder); a
GGUF's own metadata (transformers builds it, chat template included); for CLIP, the
tokenizer shipped in this package. A T5 or LLM without any is refused, naming the role.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends import component_text as text
from diffusiond.backends.component_read import read_component
from diffusiond.backends.component_vae import load_vae
from diffusiond.backends.component_weights import (
    assign,
    build_on_meta,
    build_uninitialised,
    check_tensors,
    strip_prefix,
)
from diffusiond.errors import ModelLoadError

__all__ = ["load_text_encoder", "load_vae"]

_CLIP_PAD = {"clip_l": "<|endoftext|>", "clip_g": "!"}
_CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}
_GGUF_ARCH = {"t5xxl": "t5encoder", "qwen3_lm": "qwen3", "qwen3": "qwen3"}
_QWEN3_ROPE_THETA = 1000000.0
# Tensors a file may hold that the module computes itself (older transformers saved them).
_COMPUTED = ("position_ids", "rotary_emb.inv_freq")


def load_text_encoder(
    family: str,
    role: str,
    path: Path,
    dtype: torch.dtype,
    tokenizers: Path | None,
    *,
    prefix: str = "",
) -> tuple[Any, Any]:
    """(text encoder module, tokenizer) of `role` for `family`'s pipeline, from `path` (its
    tensors under `prefix` where the file holds other parts too)."""
    what = f"{role} {path}"
    gguf = path.suffix.lower() == ".gguf"
    metadata = _gguf_metadata(path, what) if gguf else {}
    if gguf and metadata.get("general.architecture") != _GGUF_ARCH.get(_model_kind(family, role)):
        wanted = _GGUF_ARCH.get(_model_kind(family, role))
        raise ModelLoadError(
            f"{what}: a GGUF of a {metadata.get('general.architecture')!r} model; "
            + (
                f"{role} of {family} takes llama.cpp's {wanted!r} layout"
                if wanted
                else f"{role} of {family} is read from a .safetensors file only"
                + (" (llama.cpp keeps Qwen2.5-VL's vision tower apart)" if role == "llm" else "")
            )
        )
    state = {
        name: tensor
        for name, tensor in read_component(path, dtype, prefix).items()
        if not name.endswith(_COMPUTED)
    }
    if not state:
        raise ModelLoadError(f"{what}: the file holds no tensors")
    encoder = _BUILDERS[_model_kind(family, role)](state, what, dtype, metadata)
    return encoder, _tokenizer(role, path, tokenizers, metadata, what)


def _model_kind(family: str, role: str) -> str:
    if role == "llm":
        return {"flux2": "qwen3_lm", "zimage": "qwen3", "qwenimage": "qwen_vl"}.get(family, "?")
    if role == "clip_l":
        return "clip_l_projection" if family == "sd3" else "clip_l"
    return role


# ---- the modules ------------------------------------------------------------------------


def _fill(module: Any, state: dict[str, torch.Tensor], what: str) -> Any:
    """Tied tensors (an embedding and its twin) filled from the one the file has."""
    if getattr(module.config, "tie_word_embeddings", False) or hasattr(module, "shared"):
        expected = module.state_dict()
        ties = getattr(module, "_tied_weights_keys", None) or {}
        pairs = ties.items() if isinstance(ties, dict) else ()
        for target, source in pairs:
            if target in expected and target not in state and source in state:
                state[target] = state[source]
    check_tensors(module, state, what)
    assign(module, state, what)
    return module


def _clip(with_projection: bool, role: str) -> Callable[..., Any]:
    def build(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype, _: Any) -> Any:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if text.CLIP_ANCHOR not in state and any(k.endswith(text.OPEN_CLIP_ANCHOR) for k in state):
            state = text.open_clip_names(strip_prefix(state, text.OPEN_CLIP_ANCHOR), what)
        state = strip_prefix(state, text.CLIP_ANCHOR)
        if text.CLIP_ANCHOR not in state and text.CLIP_FLAT_ANCHOR in state:
            state = {_hub_clip_name(name): tensor for name, tensor in state.items()}
        if text.CLIP_ANCHOR not in state:
            raise ModelLoadError(
                f"{what}: not a CLIP text model (no tensor named *{text.CLIP_ANCHOR})"
            )
        if with_projection and "text_projection.weight" not in state:
            raise ModelLoadError(
                f"{what}: this CLIP has no text_projection.weight, which SD 3.x needs"
            )
        if not with_projection:
            state.pop("text_projection.weight", None)  # FLUX.1 takes the pooled output as is
        config = text.clip_config(state, what, act=_CLIP_ACT[role])
        model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        model = build_uninitialised(lambda: model_class(config), dtype)
        if text.CLIP_ANCHOR not in model.state_dict():  # transformers 5's CLIPTextModel
            state = {name.removeprefix("text_model."): tensor for name, tensor in state.items()}
        return _fill(model, state, what)

    return build


def _hub_clip_name(name: str) -> str:
    """transformers 5's CLIPTextModel names (no text_model.) as the hub's files have them."""
    return name if name == "text_projection.weight" else "text_model." + name


def _t5(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype, metadata: Any) -> Any:
    from transformers import T5EncoderModel

    if metadata:
        state = text.hf_names_from_gguf(state, "t5encoder", _t5_skeleton(state), what)
    state = strip_prefix(state, text.T5_ANCHOR)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if text.T5_ANCHOR not in state:
        raise ModelLoadError(f"{what}: not a T5 encoder (no tensor named *{text.T5_ANCHOR})")
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    config = text.t5_config(state, what)
    return _fill(build_uninitialised(lambda: T5EncoderModel(config), dtype), state, what)


def _t5_skeleton(state: dict[str, torch.Tensor]) -> list[str]:
    from transformers import T5Config, T5EncoderModel

    blocks = sum(1 for name in state if name.endswith("attn_norm.weight"))
    gated = any(name.endswith("ffn_gate.weight") for name in state)
    config = T5Config(
        num_layers=max(blocks, 1), feed_forward_proj="gated-gelu" if gated else "relu", d_model=8
    )
    return list(build_on_meta(lambda: T5EncoderModel(config)).state_dict())


def _qwen3(causal_lm: bool) -> Callable[..., Any]:
    def build(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype, metadata: Any) -> Any:
        from transformers import Qwen3ForCausalLM, Qwen3Model

        theta = _QWEN3_ROPE_THETA
        if metadata:
            state = text.hf_names_from_gguf(state, "qwen3", _qwen3_skeleton(state), what)
            theta = float(metadata.get("qwen3.rope.freq_base", theta))
        head = state.pop(next((k for k in state if k.endswith("lm_head.weight")), ""), None)
        state = strip_prefix(state, text.QWEN_ANCHOR)
        if text.QWEN_ANCHOR not in state:
            raise ModelLoadError(f"{what}: not a Qwen3 model (no tensor named *{text.QWEN_ANCHOR})")
        state = {"model." + name: tensor for name, tensor in state.items()}
        if head is not None and causal_lm:
            state["lm_head.weight"] = head  # a base model (Z-Image's) has no use for it
        config = text.qwen3_config(state, what, theta)
        if not causal_lm:
            state = {name[len("model.") :]: tensor for name, tensor in state.items()}
            return _fill(build_uninitialised(lambda: Qwen3Model(config), dtype), state, what)
        return _fill(build_uninitialised(lambda: Qwen3ForCausalLM(config), dtype), state, what)

    return build


def _qwen3_skeleton(state: dict[str, torch.Tensor]) -> list[str]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    blocks = sum(1 for name in state if name.endswith("attn_norm.weight"))
    config = Qwen3Config(
        num_hidden_layers=max(blocks, 1),
        hidden_size=8,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=8,
        vocab_size=8,
        tie_word_embeddings=False,
    )
    return list(build_on_meta(lambda: Qwen3ForCausalLM(config)).state_dict())


def _qwen_vl(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype, _: Any) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    state = text.qwen_vl_names(state)
    if "model.language_model." + text.QWEN_ANCHOR not in state:
        raise ModelLoadError(f"{what}: not a Qwen2.5-VL model (no model.layers.* tensors)")
    config = text.qwen_vl_config(state, what)
    model = build_uninitialised(lambda: Qwen2_5_VLForConditionalGeneration(config), dtype)
    return _fill(model, state, what)


_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor], str, torch.dtype, Any], Any]] = {
    "clip_l": _clip(False, "clip_l"),
    "clip_l_projection": _clip(True, "clip_l"),
    "clip_g": _clip(True, "clip_g"),
    "t5xxl": _t5,
    "qwen3_lm": _qwen3(causal_lm=True),
    "qwen3": _qwen3(causal_lm=False),
    "qwen_vl": _qwen_vl,
}


# ---- tokenizers ---------------------------------------------------------------------------


def _gguf_metadata(path: Path, what: str) -> dict[str, Any]:
    """A GGUF's scalar and string metadata (arrays are left out: only their presence shows)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as exc:  # the gguf package raises bare ValueErrors and worse
        raise ModelLoadError(f"{what}: not a readable GGUF file: {exc}") from None
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            out[name] = None
        else:
            out[name] = field.contents()
    return out


def _tokenizer(
    role: str, path: Path, tokenizers: Path | None, metadata: dict[str, Any], what: str
) -> Any:
    from transformers import AutoTokenizer

    folder = tokenizers / role if tokenizers is not None else None
    if folder is not None and folder.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"{role}: tokenizer folder {folder} cannot be read: {exc}"
            ) from None
    if role in _CLIP_PAD:
        from diffusiond.backends.single_file import clip_tokenizer

        return clip_tokenizer(_CLIP_PAD[role])
    if "tokenizer.ggml.model" in metadata:
        try:
            return AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{what}: its tokenizer metadata cannot be read: {exc}") from None
    where = "the file has no tokenizer (a .safetensors never does)"
    if metadata:
        where = "the GGUF has no tokenizer metadata"
    raise ModelLoadError(
        f"{what}: {where}; give {role}'s tokenizer as a Hugging Face tokenizer folder "
        f'{role}/ inside the folder the manifest\'s "tokenizers" field names'
    )
