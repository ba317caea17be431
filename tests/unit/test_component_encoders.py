"""Split-component text encoders: each published layout read back exactly.

Tiny random text encoders are written in each layout (tests/support/encoder_files.py) and
loaded by component_encoders.py: the weights must come back bit for bit at float32 and the
outputs be the same; tokenizers from a GGUF's metadata must give the original's ids; and
every way a file can be wrong must be a ModelLoadError naming the file and the role.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from diffusiond.backends.component_encoders import load_text_encoder
from diffusiond.errors import ModelLoadError
from tests.support import encoder_files as files
from tests.support import encoder_models as models
from tests.support.families import _t5, clip_tokenizer, t5_tokenizer

PROMPTS = ("a photo of a cat", "Hello,  World! 123", "", "cat cat concatenate")


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and diffusers' notes on tiny configs
        yield


# ---- text encoders -------------------------------------------------------------------------

IDS = torch.tensor([[49406, 320, 1125, 539, 49407]])
SMALL_IDS = torch.tensor([[5, 7, 9, 11, 2]])

# (family, role, factory, expected class name)
ENCODERS = [
    ("flux1", "clip_l", lambda: models.tiny_clip(False), "CLIPTextModel"),
    ("sd3", "clip_l", lambda: models.tiny_clip(True), "CLIPTextModelWithProjection"),
    ("sd3", "clip_g", lambda: models.tiny_clip(True, act="gelu"), "CLIPTextModelWithProjection"),
    ("flux1", "t5xxl", _t5, "T5EncoderModel"),
    ("flux2", "llm", lambda: models.tiny_qwen3(True), "Qwen3ForCausalLM"),
    ("zimage", "llm", lambda: models.tiny_qwen3(False), "Qwen3Model"),
    ("qwenimage", "llm", models.tiny_qwen_vl, "Qwen2_5_VLForConditionalGeneration"),
]
GGUF_ENCODERS = [case for case in ENCODERS if case[1] == "t5xxl" or case[0] in ("flux2", "zimage")]


def _tokenizer_for(role: str) -> Any:
    return t5_tokenizer() if role == "t5xxl" else models.tiny_qwen_tokenizer()


def _same_outputs(a: Any, b: Any, role: str) -> None:
    ids = IDS if role.startswith("clip") else SMALL_IDS
    with torch.no_grad():
        left = a(input_ids=ids, output_hidden_states=True)
        right = b(input_ids=ids, output_hidden_states=True)
    assert len(left.hidden_states) == len(right.hidden_states)
    for x, y in zip(left.hidden_states, right.hidden_states, strict=True):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizers")
    files.write_tokenizer_folder(folder, "t5xxl", t5_tokenizer())
    files.write_tokenizer_folder(folder, "llm", models.tiny_qwen_tokenizer())
    return folder


@pytest.mark.parametrize("case", ENCODERS, ids=lambda case: f"{case[0]}-{case[1]}")
def test_text_encoder_round_trips_from_safetensors(
    tmp_path: Path, tokenizers: Path, case: tuple[str, str, Any, str]
) -> None:
    family, role, factory, kind = case
    module = models.seeded(factory)
    path = files.write_text_encoder(tmp_path / role, role, module, "safetensors")
    encoder, _ = load_text_encoder(family, role, path, torch.float32, tokenizers)
    assert type(encoder).__name__ == kind
    models.assert_same_weights(module, encoder)
    _same_outputs(module, encoder, role)


@pytest.mark.parametrize("case", GGUF_ENCODERS, ids=lambda case: f"{case[0]}-{case[1]}")
def test_text_encoder_round_trips_from_gguf(
    tmp_path: Path, case: tuple[str, str, Any, str]
) -> None:
    family, role, factory, kind = case
    module = models.seeded(factory)
    tokenizer = _tokenizer_for(role)
    path = files.write_text_encoder(tmp_path / role, role, module, "gguf", tokenizer)
    encoder, loaded = load_text_encoder(family, role, path, torch.float32, None)
    assert type(encoder).__name__ == kind
    models.assert_same_weights(module, encoder)
    _same_outputs(module, encoder, role)
    for prompt in PROMPTS:
        assert loaded(prompt).input_ids == tokenizer(prompt).input_ids, prompt
    if role == "llm":
        chat = [{"role": "user", "content": "a cat"}]
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        got = loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert got == expected
        assert "<|im_start|>assistant" in got


def test_merges_apply_in_the_gguf_tokenizer(tmp_path: Path) -> None:
    tokenizer = models.tiny_qwen_tokenizer()
    module = models.seeded(lambda: models.tiny_qwen3(False))
    path = files.write_text_encoder(tmp_path / "llm", "llm", module, "gguf", tokenizer)
    _, loaded = load_text_encoder("zimage", "llm", path, torch.float32, None)
    cat = tokenizer.convert_tokens_to_ids("\u0120cat")
    assert loaded("a cat").input_ids[-1] == cat == tokenizer("a cat").input_ids[-1]


def test_quantized_gguf_matches_its_dequantized_values(tmp_path: Path) -> None:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    module = models.seeded(_t5)
    path = files.write_text_encoder(
        tmp_path / "t5", "t5xxl", module, "gguf", t5_tokenizer(), quantized=True
    )
    encoder, _ = load_text_encoder("flux1", "t5xxl", path, torch.float32, None)
    name = "encoder.block.1.layer.0.SelfAttention.q.weight"
    q8 = GGMLQuantizationType.Q8_0
    original = module.state_dict()[name].numpy()
    expected = torch.from_numpy(dequantize(quantize(original, q8), q8))
    assert torch.equal(encoder.state_dict()[name], expected)
    assert not torch.equal(encoder.state_dict()[name], module.state_dict()[name])


def test_gguf_rope_theta_comes_from_its_metadata(tmp_path: Path) -> None:
    from transformers import Qwen3Model

    base = models.seeded(lambda: models.tiny_qwen3(False))
    config = base.config
    config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
    module = models.seeded(lambda: Qwen3Model(config).eval())
    tokenizer = models.tiny_qwen_tokenizer()
    path = files.write_text_encoder(tmp_path / "llm", "llm", module, "gguf", tokenizer)
    encoder, _ = load_text_encoder("zimage", "llm", path, torch.float32, None)
    _same_outputs(module, encoder, "llm")


def test_other_layouts_and_prefixes(tmp_path: Path, tokenizers: Path) -> None:
    clip = models.seeded(lambda: models.tiny_clip(True, act="gelu"))
    path = files.write_text_encoder(
        tmp_path / "g", "clip_g", clip, "safetensors", open_clip=True, prefix="conditioner.m."
    )
    encoder, _ = load_text_encoder("sd3", "clip_g", path, torch.float32, None)
    models.assert_same_weights(clip, encoder)
    t5 = models.seeded(_t5)
    prefix = "text_encoders.t5xxl.transformer."
    path = files.write_text_encoder(tmp_path / "t", "t5xxl", t5, "safetensors", prefix=prefix)
    encoder, _ = load_text_encoder("chroma", "t5xxl", path, torch.float32, tokenizers)
    models.assert_same_weights(t5, encoder)
    # a CLIP-L with its projection (SD3's file) serves FLUX.1, which has no use for it
    path = files.write_text_encoder(tmp_path / "l", "clip_l", clip, "safetensors")
    encoder, _ = load_text_encoder("flux1", "clip_l", path, torch.float32, None)
    assert type(encoder).__name__ == "CLIPTextModel"
    # Qwen2.5-VL as the hub keeps it (model.layers.*, visual.*)
    vl = models.seeded(models.tiny_qwen_vl)
    hub = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
        for k, v in files._untied(dict(vl.state_dict())).items()
    }
    save_file(hub, str(tmp_path / "vl.safetensors"))
    encoder, _ = load_text_encoder(
        "qwenimage", "llm", tmp_path / "vl.safetensors", torch.float32, tokenizers
    )
    models.assert_same_weights(vl, encoder)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_tied_lm_head_comes_from_the_embedding(tmp_path: Path, fmt: str) -> None:
    from transformers import Qwen3ForCausalLM

    config = models.tiny_qwen3(True).config
    config.tie_word_embeddings = True  # as Qwen3-4B's (FLUX.2 klein's): no lm_head stored
    module = models.seeded(lambda: Qwen3ForCausalLM(config).eval())
    tokenizer = models.tiny_qwen_tokenizer()
    path = files.write_text_encoder(tmp_path / "llm", "llm", module, fmt, tokenizer)
    names = files._untied(dict(module.state_dict()))
    assert "lm_head.weight" not in names
    folder = tmp_path / "tokenizers"
    files.write_tokenizer_folder(folder, "llm", tokenizer)
    encoder, _ = load_text_encoder("flux2", "llm", path, torch.float32, folder)
    assert encoder.config.tie_word_embeddings
    models.assert_same_weights(module, encoder)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_text_encoder_in_half_precision(tmp_path: Path, fmt: str) -> None:
    module = models.seeded(_t5)
    path = files.write_text_encoder(tmp_path / "t5", "t5xxl", module, fmt, t5_tokenizer())
    folder = tmp_path / "tok"
    files.write_tokenizer_folder(folder, "t5xxl", t5_tokenizer())
    encoder, _ = load_text_encoder("flux1", "t5xxl", path, torch.bfloat16, folder)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    models.assert_same_weights(module.to(torch.bfloat16), encoder)


# ---- tokenizers ---------------------------------------------------------------------------


def test_clip_gets_the_shipped_tokenizer_with_its_pad(tmp_path: Path) -> None:
    clip = models.seeded(lambda: models.tiny_clip(True))
    path = files.write_text_encoder(tmp_path / "c", "clip_l", clip, "safetensors")
    _, tokenizer_l = load_text_encoder("sd3", "clip_l", path, torch.float32, None)
    _, tokenizer_g = load_text_encoder("sd3", "clip_g", path, torch.float32, tmp_path)
    assert len(tokenizer_l) == models.CLIP_VOCAB == len(tokenizer_g)
    assert (tokenizer_l.pad_token, tokenizer_g.pad_token) == ("<|endoftext|>", "!")
    assert tokenizer_l("a photo").input_ids[0] == models.CLIP_VOCAB - 2


def test_a_tokenizers_folder_wins(tmp_path: Path) -> None:
    folder = tmp_path / "tokenizers"
    files.write_tokenizer_folder(folder, "clip_l", clip_tokenizer())  # 514 byte tokens
    reversed_ascii = _reordered_t5_tokenizer()
    files.write_tokenizer_folder(folder, "t5xxl", reversed_ascii)
    clip = models.seeded(lambda: models.tiny_clip(False))
    path = files.write_text_encoder(tmp_path / "c", "clip_l", clip, "safetensors")
    _, tokenizer = load_text_encoder("flux1", "clip_l", path, torch.float32, folder)
    assert len(tokenizer) == len(clip_tokenizer()) != models.CLIP_VOCAB
    t5 = models.seeded(_t5)
    path = files.write_text_encoder(tmp_path / "t", "t5xxl", t5, "gguf", t5_tokenizer())
    _, tokenizer = load_text_encoder("flux1", "t5xxl", path, torch.float32, folder)
    assert tokenizer("abc").input_ids == reversed_ascii("abc").input_ids
    assert tokenizer("abc").input_ids != t5_tokenizer()("abc").input_ids


def _reordered_t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(code), -2.0) for code in reversed(range(32, 127))]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def test_a_tokenizer_is_needed_for_t5_and_llm(tmp_path: Path) -> None:
    t5 = models.seeded(_t5)
    path = files.write_text_encoder(tmp_path / "t", "t5xxl", t5, "safetensors")
    with pytest.raises(ModelLoadError, match=r"t5xxl .*a \.safetensors never does.*tokenizers"):
        load_text_encoder("flux1", "t5xxl", path, torch.float32, None)
    empty = tmp_path / "tokenizers"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="t5xxl/ inside"):
        load_text_encoder("flux1", "t5xxl", path, torch.float32, empty)
    path = files.write_text_encoder(tmp_path / "g", "t5xxl", t5, "gguf")  # no tokenizer
    with pytest.raises(ModelLoadError, match="no tokenizer metadata"):
        load_text_encoder("flux1", "t5xxl", path, torch.float32, None)
    (empty / "t5xxl").mkdir()
    (empty / "t5xxl" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer folder .*t5xxl cannot be read"):
        load_text_encoder("flux1", "t5xxl", path, torch.float32, empty)


# ---- errors -------------------------------------------------------------------------------


def _encoder_error(path: Path, family: str, role: str, tokenizers: Path | None = None) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_text_encoder(family, role, path, torch.float32, tokenizers)
    message = str(caught.value)
    assert message.startswith(f"{role} ")
    assert str(path) in message
    return message


def test_text_encoder_tensor_errors(tmp_path: Path, tokenizers: Path) -> None:
    state = files._untied(dict(models.seeded(_t5).state_dict()))
    path = tmp_path / "t5.safetensors"

    def wrong(changed: dict[str, torch.Tensor]) -> str:
        save_file(changed, str(path))
        return _encoder_error(path, "flux1", "t5xxl", tokenizers)

    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert "missing" in wrong({k: v for k, v in state.items() if k != name})
    assert "no place for" in wrong({**state, "encoder.block.0.extra.weight": torch.zeros(2)})
    assert "wrong shape" in wrong({**state, name: torch.zeros(3, 3)})
    assert "not a T5 encoder" in wrong({"shared.weight": state["shared.weight"]})
    assert "no tensors" in wrong({})
    clip = files._untied(dict(models.seeded(lambda: models.tiny_clip(False)).state_dict()))
    save_file({"text_model." + k: v for k, v in clip.items()}, str(path))
    assert "not a CLIP" not in _encoder_error(path, "flux1", "t5xxl", tokenizers)
    assert "text_projection" in _encoder_error(path, "sd3", "clip_l")
    save_file(state, str(path))
    assert "not a CLIP text model" in _encoder_error(path, "flux1", "clip_l")
    assert "not a Qwen3" in _encoder_error(path, "flux2", "llm", tokenizers)
    assert "not a Qwen2.5-VL" in _encoder_error(path, "qwenimage", "llm", tokenizers)


def test_gguf_errors(tmp_path: Path) -> None:
    qwen = models.seeded(lambda: models.tiny_qwen3(True))
    tokenizer = models.tiny_qwen_tokenizer()
    path = files.write_text_encoder(tmp_path / "llm", "llm", qwen, "gguf", tokenizer)
    message = _encoder_error(path, "qwenimage", "llm")
    assert "'qwen3'" in message
    assert "vision tower" in message
    assert "'t5encoder'" in _encoder_error(path, "flux1", "t5xxl")
    assert ".safetensors file only" in _encoder_error(path, "flux1", "clip_l")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(40))
    assert "GGUF" in _encoder_error(garbage, "flux1", "t5xxl")
    # a tensor llama.cpp's layout has no such name for
    import gguf

    stray = tmp_path / "stray.gguf"
    writer = gguf.GGUFWriter(str(stray), arch="qwen3")
    writer.add_tensor("blk.0.attn_q.weight", torch.zeros(4, 4).numpy())
    writer.add_tensor("blk.0.mystery.weight", torch.zeros(4).numpy())
    files._finish(writer)
    assert "no place for: blk.0.mystery.weight" in _encoder_error(stray, "zimage", "llm")


# ---- in the families' pipelines -----------------------------------------------------------

_LLMS = {
    "flux2": lambda: models.tiny_qwen3(True, layers=28),  # the pipeline reads layers 9, 18, 27
    "zimage": lambda: models.tiny_qwen3(False),
    "qwenimage": models.tiny_qwen_vl,
}
_OTHERS = {
    "clip_l": lambda family: models.tiny_clip(family == "sd3"),
    "clip_g": lambda family: models.tiny_clip(True, act="gelu"),
    "t5xxl": lambda family: _t5(),
}


def _component_encoders(folder: Path, family: str) -> dict[str, Any]:
    """The family's text encoder and tokenizer arguments, each read from its own file:
    GGUFs (with their tokenizers) where llama.cpp has the layout, else safetensors."""
    from diffusiond.backends.component_pipeline import encoder_arguments

    parts: dict[str, Any] = {}
    tokenizers = folder / "tokenizers"
    for role, encoder_name, tokenizer_name in encoder_arguments(family):
        factory = _LLMS[family] if role == "llm" else partial(_OTHERS[role], family)
        module = models.seeded(factory)
        gguf = role == "t5xxl" or (role == "llm" and family != "qwenimage")
        tokenizer = _tokenizer_for(role)
        if family == "qwenimage":
            files.write_tokenizer_folder(tokenizers, role, tokenizer)
        fmt = "gguf" if gguf else "safetensors"
        path = files.write_text_encoder(folder / role, role, module, fmt, tokenizer)
        encoder, loaded = load_text_encoder(family, role, path, torch.float32, tokenizers)
        parts[encoder_name], parts[tokenizer_name] = encoder, loaded
    return parts


@pytest.mark.parametrize("family", ["flux1", "sd3", "chroma", "flux2", "zimage", "qwenimage"])
def test_the_family_pipeline_encodes_a_prompt_with_them(tmp_path: Path, family: str) -> None:
    import diffusers

    from diffusiond.backends.families import FAMILIES

    parts = _component_encoders(tmp_path, family)
    pipeline_class = getattr(diffusers, FAMILIES[family].pipeline)
    pipeline = pipeline_class(transformer=None, vae=None, scheduler=None, **parts)
    extra: dict[str, Any] = {"max_sequence_length": 64} if family in ("flux1", "sd3") else {}
    if family == "sd3":
        extra |= {"prompt_2": None, "prompt_3": None}
    with torch.no_grad():
        out = pipeline.encode_prompt(prompt="a photo of a cat", device="cpu", **extra)
    embeds = out[0][0] if family == "zimage" else out[0]  # Z-Image gives a list a prompt
    assert torch.isfinite(embeds).all()
    assert embeds.shape[-1] in (16, 32, 48)  # a text encoder's width (FLUX.2: three layers')
