"""The model catalog: what in a models dir is a model, its id, format and architecture."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from diffusiond.backends.catalog import (
    BUILTIN_ID,
    MODEL_FILE_SUFFIXES,
    ModelCatalog,
    architecture_from_keys,
)
from diffusiond.backends.single_file import SINGLE_FILE_SUFFIXES
from diffusiond.errors import InvalidRequest, ModelLoadError

SD1_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "first_stage_model.decoder.conv_in.weight",
)


def safetensors_header_only(path: Path, keys: tuple[str, ...]) -> Path:
    """A .safetensors file with these tensor names, each one zero-sized (no weights)."""
    header = {key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for key in keys}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def diffusers_folder(
    path: Path, class_name: str = "StableDiffusionPipeline", width: int = 768
) -> Path:
    (path / "text_encoder").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": width}))
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    diffusers_folder(folder / "dreamy")
    diffusers_folder(folder / "wide", width=1024)
    diffusers_folder(folder / "xl", class_name="StableDiffusionXLPipeline")
    safetensors_header_only(folder / "single.safetensors", SD1_KEYS)
    (folder / "old.ckpt").write_bytes(b"not read by the catalog")
    (folder / "quant.gguf").write_bytes(b"GGUF")
    (folder / "loras").mkdir()
    diffusers_folder(folder / "loras" / "inside")
    safetensors_header_only(folder / "lora.safetensors", ("lora_unet_down.alpha",))
    (folder / "notes.txt").write_text("no model")
    (folder / "half-copied").mkdir()  # a folder with no model_index.json
    (folder / "broken.safetensors").write_bytes(b"\x01")
    return folder


def test_every_folder_and_checkpoint_is_a_model_with_its_format_and_architecture(
    models_dir: Path,
) -> None:
    catalog = ModelCatalog(models_dir)
    listed = {entry.id: (entry.format, entry.architecture) for entry in catalog.entries()}
    assert listed == {
        "builtin": ("builtin", "sd1"),
        "dreamy": ("diffusers", "sd1"),
        "wide": ("diffusers", "sd2"),
        "xl": ("diffusers", "sdxl"),
        "single": ("safetensors", "sd1"),
        "old": ("ckpt", "unknown"),
        "quant": ("gguf", "unknown"),
    }
    assert catalog.entries()[0].id == BUILTIN_ID
    assert catalog.default_id == BUILTIN_ID


def test_architecture_from_tensor_names() -> None:
    unet = "model.diffusion_model.x"
    assert architecture_from_keys(frozenset(SD1_KEYS)) == "sd1"
    assert architecture_from_keys(frozenset({unet, "cond_stage_model.model.x"})) == "sd2"
    assert architecture_from_keys(frozenset({unet, "conditioner.embedders.1.model.x"})) == "sdxl"
    assert architecture_from_keys(frozenset({"lora_unet_x"})) == "unknown"


def test_the_single_file_loader_suffixes_are_all_listed() -> None:
    assert set(SINGLE_FILE_SUFFIXES) <= set(MODEL_FILE_SUFFIXES)


def test_the_default_is_an_id_or_a_path_inside_or_outside_the_dir(
    models_dir: Path, tmp_path: Path
) -> None:
    assert ModelCatalog(models_dir, default=Path("dreamy")).default_id == "dreamy"
    assert ModelCatalog(models_dir, default=models_dir / "single.safetensors").default_id == (
        "single"
    )
    outside = diffusers_folder(tmp_path / "elsewhere")
    catalog = ModelCatalog(models_dir, default=outside)
    assert catalog.default_id == "elsewhere"
    found = catalog.find(None)
    assert found is not None
    assert found.path == outside
    assert "elsewhere" in [entry.id for entry in catalog.entries()]
    with pytest.raises(ModelLoadError, match=r"no model of the models dir has this id \(ids: "):
        ModelCatalog(models_dir, default=Path("nowhere"))
    with pytest.raises(ModelLoadError, match="model path /no/such does not exist"):
        ModelCatalog(models_dir, default=Path("/no/such"))


def test_an_unknown_id_is_refused_naming_the_field_and_the_ids(models_dir: Path) -> None:
    catalog = ModelCatalog(models_dir)
    catalog.check(None)
    catalog.check("dreamy")
    with pytest.raises(InvalidRequest) as refused:
        catalog.check("nope")
    assert refused.value.field == "model"
    assert "builtin, dreamy, old, quant, single, wide, xl" in str(refused.value)


def test_the_dir_is_rescanned_for_a_new_id_and_a_removed_one(models_dir: Path) -> None:
    catalog = ModelCatalog(models_dir)
    assert catalog.find("fresh") is None
    safetensors_header_only(models_dir / "fresh.safetensors", SD1_KEYS)
    assert catalog.find("fresh") is not None  # a miss rescans
    (models_dir / "fresh.safetensors").unlink()
    assert catalog.find("fresh") is None  # its file is gone: rescanned, not served stale
    assert "fresh" not in [entry.id for entry in catalog.entries()]


def test_a_taken_id_keeps_the_first_and_builtin_is_reserved(models_dir: Path) -> None:
    safetensors_header_only(models_dir / "dreamy.safetensors", SD1_KEYS)
    diffusers_folder(models_dir / "builtin")
    listed = {entry.id: entry.format for entry in ModelCatalog(models_dir).entries()}
    assert listed["dreamy"] == "diffusers"  # sorted: the folder comes first
    assert listed["builtin"] == "builtin"


def test_no_models_dir_lists_the_builtin_model_only() -> None:
    assert [entry.id for entry in ModelCatalog(None).entries()] == ["builtin"]
