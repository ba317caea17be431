"""Text encoder configs read from a component file's tensor shapes, and GGUF names undone.

A released text encoder's .safetensors has no config.json beside it, so each config here is
read from the shapes of the Hugging Face-named tensors; what no shape records is the
published model's value, by these rules:

- CLIP (clip_l, clip_g): 64-wide heads (one head for a model narrower than 64); OpenAI's
  CLIP-L uses quick_gelu, OpenCLIP's bigG gelu; the vocabulary's last two ids are its
  start and end tokens.
- T5 (t5xxl): the heads from the relative attention bias, gated-gelu where the feed-forward
  has two input projections (T5 v1.1, as FLUX.1 and SD3 use) and relu where it has one.
- Qwen3 (llm of FLUX.2 and Z-Image): the head width from its q/k norms; rope theta 1e6.
- Qwen2.5-VL (llm of Qwen-Image): 128-wide heads in the language model and 80-wide ones
  in the vision tower (one head below that), the published multimodal rope sections scaled
  to the head width, and its full-attention blocks every eighth.
- A language model without an `lm_head` has it tied to its token embedding.

A GGUF text encoder (llama.cpp's `t5encoder` or `qwen3`) is renamed back to Hugging Face
names with the `gguf` package's own tensor-name table, and its config taken the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from diffusiond.errors import ModelLoadError

CLIP_ANCHOR = "text_model.embeddings.token_embedding.weight"
CLIP_FLAT_ANCHOR = "embeddings.token_embedding.weight"
OPEN_CLIP_ANCHOR = "transformer.resblocks.0.attn.in_proj_weight"
T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
QWEN_ANCHOR = "layers.0.self_attn.q_proj.weight"

_CLIP_HEAD, _QWEN_HEAD, _VISION_HEAD = 64, 128, 80
_MROPE_SECTION = (16, 24, 24)  # Qwen2.5-VL's, for 128-wide heads
_FULL_ATTENTION_EVERY = 8
_QWEN_VL_TOKENS = {  # Qwen2.5-VL's published vision token ids
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


class Shapes:
    """Shape look-ups in a state dict, each missing tensor a ModelLoadError for `what`."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        self.state = state
        self.what = what

    def __call__(self, name: str, dim: int = 0) -> int:
        if name not in self.state:
            raise ModelLoadError(f"{self.what}: tensor {name} missing")
        return int(self.state[name].shape[dim])

    def count(self, pattern: str) -> int:
        found = {int(m[1]) for name in self.state if (m := re.match(pattern, name))}
        if not found:
            raise ModelLoadError(f"{self.what}: no tensors match {pattern!r}")
        return max(found) + 1


def _heads(width: int, head: int) -> int:
    """Heads of `head` width; one head where the model is narrower (or not a multiple)."""
    return width // head if width >= head and width % head == 0 else 1


def clip_config(state: Mapping[str, torch.Tensor], what: str, *, act: str) -> Any:
    from transformers import CLIPTextConfig

    shape = Shapes(state, what)
    vocab = shape(CLIP_ANCHOR)
    hidden = shape(CLIP_ANCHOR, 1)
    projection = shape("text_projection.weight") if "text_projection.weight" in state else hidden
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shape("text_model.encoder.layers.0.mlp.fc1.weight"),
        num_hidden_layers=shape.count(r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=_heads(hidden, _CLIP_HEAD),
        max_position_embeddings=shape("text_model.embeddings.position_embedding.weight"),
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=1,
    )


def open_clip_names(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's original text tower names (`transformer.resblocks.*`, one fused in_proj)
    as transformers' CLIP has them, by diffusers' own converter."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if "token_embedding.weight" not in state:
        raise ModelLoadError(f"{what}: tensor token_embedding.weight missing")
    width = int(state["token_embedding.weight"].shape[1])
    stand_in = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    converted: dict[str, torch.Tensor] = convert_open_clip_checkpoint(
        stand_in, dict(state), prefix=""
    )
    return converted


def t5_config(state: Mapping[str, torch.Tensor], what: str) -> Any:
    from transformers import T5Config

    shape = Shapes(state, what)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    heads = shape(bias, 1)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    ff = "wi_0" if gated else "wi"
    return T5Config(
        vocab_size=shape("shared.weight"),
        d_model=shape("shared.weight", 1),
        d_kv=shape(T5_ANCHOR) // heads,
        d_ff=shape(f"encoder.block.0.layer.1.DenseReluDense.{ff}.weight"),
        num_layers=shape.count(r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=shape(bias),
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def qwen3_config(state: Mapping[str, torch.Tensor], what: str, rope_theta: float) -> Any:
    """For names under `model.` (Qwen3ForCausalLM's), the lm_head beside them if any."""
    from transformers import Qwen3Config

    shape = Shapes(state, what)
    head_dim = shape("model.layers.0.self_attn.q_norm.weight")
    return Qwen3Config(
        vocab_size=shape("model.embed_tokens.weight"),
        hidden_size=shape("model.embed_tokens.weight", 1),
        intermediate_size=shape("model.layers.0.mlp.gate_proj.weight"),
        num_hidden_layers=shape.count(r"model\.layers\.(\d+)\."),
        num_attention_heads=shape("model." + QWEN_ANCHOR) // head_dim,
        num_key_value_heads=shape("model.layers.0.self_attn.k_proj.weight") // head_dim,
        head_dim=head_dim,
        rope_theta=rope_theta,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings="lm_head.weight" not in state,
    )


def qwen_vl_config(state: Mapping[str, torch.Tensor], what: str) -> Any:
    """For transformers' Qwen2_5_VLForConditionalGeneration names (model.language_model.*,
    model.visual.*, lm_head)."""
    from transformers import Qwen2_5_VLConfig

    shape = Shapes(state, what)
    text = "model.language_model."
    hidden = shape(text + "embed_tokens.weight", 1)
    head_dim = hidden // _heads(hidden, _QWEN_HEAD)
    section = [part * head_dim // _QWEN_HEAD for part in _MROPE_SECTION]
    vision = "model.visual."
    patch = vision + "patch_embed.proj.weight"
    width = shape(patch)
    depth = shape.count(r"model\.visual\.blocks\.(\d+)\.")
    merge_in = shape(vision + "merger.mlp.0.weight", 1)
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": shape(text + "embed_tokens.weight"),
            "hidden_size": hidden,
            "intermediate_size": shape(text + "layers.0.mlp.gate_proj.weight"),
            "num_hidden_layers": shape.count(r"model\.language_model\.layers\.(\d+)\."),
            "num_attention_heads": hidden // head_dim,
            "num_key_value_heads": shape(text + "layers.0.self_attn.k_proj.weight") // head_dim,
            "rope_scaling": {"mrope_section": section, "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": "lm_head.weight" not in state,
        },
        vision_config={
            "depth": depth,
            "hidden_size": width,
            "in_channels": shape(patch, 1),
            "temporal_patch_size": shape(patch, 2),
            "patch_size": shape(patch, 3),
            "intermediate_size": shape(vision + "blocks.0.mlp.gate_proj.weight"),
            "num_heads": _heads(width, _VISION_HEAD),
            "out_hidden_size": shape(vision + "merger.mlp.2.weight"),
            "spatial_merge_size": round((merge_in // width) ** 0.5),
            "fullatt_block_indexes": list(
                range(_FULL_ATTENTION_EVERY - 1, depth, _FULL_ATTENTION_EVERY)
            ),
        },
        tie_word_embeddings="lm_head.weight" not in state,
        **_QWEN_VL_TOKENS,
    )


def qwen_vl_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub layout of Qwen2.5-VL (model.layers.*, visual.*) in transformers' names."""
    return {_qwen_vl_name(name): tensor for name, tensor in state.items()}


def _qwen_vl_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(
        ("model.language_model.", "model.visual.")
    ):
        return "model.language_model." + name[len("model.") :]
    return name


def hf_names_from_gguf(
    state: Mapping[str, torch.Tensor], arch_name: str, skeleton: list[str], what: str
) -> dict[str, torch.Tensor]:
    """`state`'s llama.cpp names as Hugging Face's, by the gguf package's table over the
    names of a model of the same depth (`skeleton`); a name it has no place for is refused."""
    import gguf

    arch = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    blocks = 1 + max((int(m[1]) for n in state if (m := re.search(r"blk\.(\d+)\.", n))), default=-1)
    table = gguf.TensorNameMap(arch, blocks)
    back: dict[str, list[str]] = {}
    for hf_name in skeleton:
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            back.setdefault(gguf_name, []).append(hf_name)
    unknown = sorted(name for name in state if name not in back)
    if unknown:
        raise ModelLoadError(
            f"{what}: tensors llama.cpp's {arch_name} layout has no place for: "
            + ", ".join(unknown[:3])
        )
    return {hf: tensor for name, tensor in state.items() for hf in back[name]}
