"""The LoRA folder: format and architecture from safetensors headers, the catalog's rescans,
and the API's check of a request's LoRAs."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from diffusiond.backends.lora_files import (
    LoraCatalog,
    LoraChoices,
    lora_architecture,
    lora_folder,
    lora_format,
    read_shapes,
)
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import LoraWeight

Shapes = dict[str, tuple[int, ...]]

KOHYA_SD1: Shapes = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
        4,
        768,
    ),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": (),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
}
KOHYA_SD2_TEXT_ONLY: Shapes = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (8, 1024),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (1024, 8),
}
KOHYA_SDXL: Shapes = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
}
KOHYA_SDXL_UNET_ONLY: Shapes = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v.lora_down.weight": (4, 2048),
}
PEFT_SD1: Shapes = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 768),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": (320, 4),
}
PEFT_SD2_OLD_NAMES: Shapes = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": (4, 1024),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": (320, 4),
}
PEFT_SDXL_TEXT: Shapes = {
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1280),
}
PEFT_UNET_SELF_ATTENTION_ONLY: Shapes = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 320),
}
NOT_A_LORA: Shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}


def write_header(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file's header (offsets included) with no weights after it: all a
    catalog reads."""
    header: dict[str, object] = {"__metadata__": {"ss_network_dim": "4"}}
    offset = 0
    for key, shape in shapes.items():
        size = 2
        for dimension in shape:
            size *= dimension
        header[key] = {
            "dtype": "F16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


@pytest.mark.parametrize(
    ("shapes", "kind", "architecture"),
    [
        (KOHYA_SD1, "kohya", "sd1"),
        (KOHYA_SD2_TEXT_ONLY, "kohya", "sd2"),
        (KOHYA_SDXL, "kohya", "sdxl"),
        (KOHYA_SDXL_UNET_ONLY, "kohya", "sdxl"),
        (PEFT_SD1, "peft", "sd1"),
        (PEFT_SD2_OLD_NAMES, "peft", "sd2"),
        (PEFT_SDXL_TEXT, "peft", "sdxl"),
        (PEFT_UNET_SELF_ATTENTION_ONLY, "peft", "unknown"),
    ],
)
def test_format_and_architecture_come_from_the_header(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], kind: str, architecture: str
) -> None:
    read = read_shapes(write_header(tmp_path / "lora.safetensors", shapes))
    assert read == shapes
    assert lora_format(read) == kind
    assert lora_architecture(read) == architecture


def test_a_checkpoint_is_not_a_lora() -> None:
    assert lora_format(NOT_A_LORA) is None


@pytest.mark.parametrize(
    "raw", [b"", b"\x05\x00", struct.pack("<Q", 1 << 40), struct.pack("<Q", 2) + b"[]"]
)
def test_a_malformed_header_is_a_value_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"safetensors|JSON object"):
        read_shapes(path)


def test_the_folder_is_loras_dir_else_models_dir_loras(tmp_path: Path) -> None:
    assert lora_folder(tmp_path, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert lora_folder(tmp_path, None) == tmp_path / "loras"
    assert lora_folder(None, None) is None


def test_the_catalog_lists_loras_by_stem_and_leaves_out_the_rest(tmp_path: Path) -> None:
    write_header(tmp_path / "b.detail.safetensors", KOHYA_SD1)
    write_header(tmp_path / "A.SAFETENSORS", KOHYA_SDXL)
    write_header(tmp_path / "checkpoint.safetensors", NOT_A_LORA)
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    (tmp_path / "readme.txt").write_text("hello")
    entries = LoraCatalog(tmp_path).entries()
    assert [(e.name, e.format, e.architecture) for e in entries] == [
        ("A", "kohya", "sdxl"),
        ("b.detail", "kohya", "sd1"),
    ]
    assert LoraCatalog(tmp_path / "missing").entries() == ()
    assert LoraCatalog(None).entries() == ()


def test_an_unknown_name_rescans_and_a_changed_file_is_read_again(tmp_path: Path) -> None:
    catalog = LoraCatalog(tmp_path)
    assert catalog.find("late") is None
    path = write_header(tmp_path / "late.safetensors", PEFT_SD1)
    found = catalog.find("late")
    assert found is not None
    assert found.architecture == "sd1"
    write_header(path, KOHYA_SDXL)
    os.utime(path, ns=(found.mtime_ns + 10**9, found.mtime_ns + 10**9))
    changed = catalog.find("late")
    assert changed is not None
    assert changed.architecture == "sdxl"
    path.unlink()
    assert catalog.find("late") is None


def _choices(folder: Path, architecture: str = "sd1") -> tuple[LoraChoices, list[str | None]]:
    asked: list[str | None] = []

    def model_architecture(model: str | None) -> str:
        asked.append(model)
        return architecture

    return LoraChoices(LoraCatalog(folder), model_architecture), asked


def test_choices_list_and_accept_loras_of_the_models_architecture(tmp_path: Path) -> None:
    write_header(tmp_path / "one.safetensors", KOHYA_SD1)
    write_header(tmp_path / "two.safetensors", PEFT_SD1)
    choices, asked = _choices(tmp_path)
    assert choices.listing() == [
        {"name": "one", "architecture": "sd1"},
        {"name": "two", "architecture": "sd1"},
    ]
    choices.check("other-model", (LoraWeight("one", 1.0), LoraWeight("two", -2.0)))
    assert asked == ["other-model"]  # the model's architecture is asked once per request
    choices.check(None, ())
    assert asked == ["other-model"]


def test_choices_refuse_an_unknown_name_naming_the_available_ones(tmp_path: Path) -> None:
    write_header(tmp_path / "one.safetensors", KOHYA_SD1)
    choices, _ = _choices(tmp_path)
    with pytest.raises(InvalidRequest) as refused:
        choices.check(None, (LoraWeight("one", 1.0), LoraWeight("nope", 0.0)))
    assert refused.value.field == "loras"
    assert "'nope'" in refused.value.message
    assert "available: one" in refused.value.message


def test_choices_refuse_another_architecture_unless_one_side_is_unknown(tmp_path: Path) -> None:
    write_header(tmp_path / "xl.safetensors", KOHYA_SDXL)
    write_header(tmp_path / "vague.safetensors", PEFT_UNET_SELF_ATTENTION_ONLY)
    choices, _ = _choices(tmp_path, "sd1")
    with pytest.raises(InvalidRequest) as refused:
        choices.check(None, (LoraWeight("xl", 1.0),))
    assert refused.value.field == "loras"
    assert "'xl' is a LoRA for sdxl, and the model is sd1" in refused.value.message
    choices.check(None, (LoraWeight("vague", 1.0),))
    unloaded, _ = _choices(tmp_path, "unknown")
    unloaded.check(None, (LoraWeight("xl", 1.0),))
