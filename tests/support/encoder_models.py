"""Tiny text encoders for the split-component tests, and the Qwen tokenizer they use.

The CLIPs use the real CLIP vocabulary's size (49,408), so the CLIP tokenizer that ships
in the package fits them; each model keeps to the shapes' rules the loaders read configs
by (component_text.py): CLIP one head below 64 wide, Qwen2.5-VL one head below 128 with
the rope sections scaled to it, Qwen3's published rope theta and the published norm eps.
The Qwen tokenizer has merges, as every llama.cpp GGUF of a Qwen model does.
"""

from __future__ import annotations

from typing import Any

import torch

CLIP_VOCAB = 49408


def tiny_clip(with_projection: bool, *, act: str = "quick_gelu", layers: int = 2) -> Any:
    """A CLIP text model over the real CLIP vocabulary, small enough for unit tests."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=1,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        projection_dim=16,
        hidden_act=act,
        bos_token_id=CLIP_VOCAB - 2,
        eos_token_id=CLIP_VOCAB - 1,
        pad_token_id=1,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


_MERGES = (("\u0120", "c"), ("a", "t"), ("\u0120c", "at"))
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer with three merges (" cat"), the chat markers and the
    tiny families' chat template: llama.cpp's GGUFs always carry merges."""
    from transformers import Qwen2Tokenizer

    from diffusiond.backends.builtin_model import _byte_symbols
    from tests.support.families import _CHAT_TEMPLATE

    vocab = {symbol: index for index, symbol in enumerate(_byte_symbols())}
    for left, right in _MERGES:
        vocab[left + right] = len(vocab)
    for token in _QWEN_SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(_MERGES))
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


TINY_QWEN_VOCAB = 256 + len(_MERGES) + len(_QWEN_SPECIAL)


def tiny_qwen3(causal_lm: bool, layers: int = 2) -> Any:
    """A Qwen3 text model over `tiny_qwen_tokenizer`'s vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=TINY_QWEN_VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        rope_theta=1000000.0,  # Qwen3's published value, which the loader assumes
        bos_token_id=TINY_QWEN_VOCAB - 3,
        eos_token_id=TINY_QWEN_VOCAB - 1,
        pad_token_id=TINY_QWEN_VOCAB - 3,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def tiny_qwen_vl() -> Any:
    """A Qwen2.5-VL with one 16-wide head (the loader's rule: 128-wide heads, one below)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": TINY_QWEN_VOCAB,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,  # the published value, which the loader assumes
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_heads": 1,
            "out_hidden_size": 16,
            "fullatt_block_indexes": [],
        },
        hidden_size=16,
        vocab_size=TINY_QWEN_VOCAB,
        vision_start_token_id=TINY_QWEN_VOCAB,
        vision_end_token_id=TINY_QWEN_VOCAB,
        vision_token_id=TINY_QWEN_VOCAB,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def seeded(factory: Any, seed: int = 0) -> Any:
    """What `factory` makes with the random generator at `seed` (the caller's left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same tensor names, each bit for bit equal."""
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name
