"""Split components: roles, the manifest, the family read from tensor names (pure logic)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusiond.backends.catalog import ModelCatalog
from diffusiond.backends.components import (
    MANIFEST_NAME,
    components_from_files,
    detect_family,
    read_manifest,
    required_roles,
    single_file_components,
    tensor_names,
)
from diffusiond.backends.factory import flag_components, model_catalog
from diffusiond.errors import ModelLoadError, SettingsError
from diffusiond.settings import Settings

SIGNATURE = {
    "flux1": "double_blocks.0.img_attn.norm.key_norm.scale",
    "flux2": "single_stream_modulation.lin.weight",
    "chroma": "distilled_guidance_layer.in_proj.bias",
    "sd3": "joint_blocks.0.context_block.adaLN_modulation.1.bias",
    "zimage": "cap_pad_token",
    "qwenimage": "txt_norm.weight",
}


def _tensors_file(path: Path, *names: str) -> Path:
    save_file({name: torch.zeros(2) for name in names}, str(path))
    return path


def _flux_files(folder: Path, *, prefix: str = "") -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "diffusion_model": _tensors_file(
            folder / "flux.safetensors",
            prefix + SIGNATURE["flux1"],
            prefix + "double_blocks.0.img_attn.qkv.weight",
        ),
        "vae": _tensors_file(folder / "ae.safetensors", "decoder.conv_in.weight"),
        "clip_l": _tensors_file(folder / "clip_l.safetensors", "text_model.x"),
        "t5xxl": _tensors_file(folder / "t5.safetensors", "encoder.x"),
    }


@pytest.mark.parametrize("family", sorted(SIGNATURE))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_each_family_is_told_by_its_signature_tensor(family: str, prefix: str) -> None:
    keys = {prefix + SIGNATURE[family], prefix + "some.other.weight"}
    if family in ("flux2", "chroma"):  # they share FLUX.1's blocks: their own key decides
        keys.add(prefix + SIGNATURE["flux1"])
    assert detect_family(keys) == family


def test_an_sd_unet_is_no_family() -> None:
    assert detect_family({"model.diffusion_model.input_blocks.0.0.weight"}) is None


def test_roles_a_family_needs_come_from_its_table() -> None:
    assert required_roles("flux1") == ("diffusion_model", "vae", "clip_l", "t5xxl")
    assert required_roles("sd3") == ("diffusion_model", "vae", "clip_l", "clip_g", "t5xxl")
    assert required_roles("zimage") == ("diffusion_model", "vae", "llm")


def test_files_with_every_role_make_components_in_the_family_order(tmp_path: Path) -> None:
    files = _flux_files(tmp_path, prefix="model.diffusion_model.")
    components = components_from_files(dict(reversed(files.items())))
    assert components.family == "flux1"
    assert list(components.files) == ["diffusion_model", "vae", "clip_l", "t5xxl"]
    assert components.names["t5xxl"] == "t5.safetensors"


def test_a_missing_role_is_named(tmp_path: Path) -> None:
    files = _flux_files(tmp_path)
    del files["t5xxl"]
    with pytest.raises(ModelLoadError, match=r"needs .*t5xxl.*t5xxl not given"):
        components_from_files(files, what="--diffusion-model")


def test_a_role_the_family_takes_not_is_named(tmp_path: Path) -> None:
    files = _flux_files(tmp_path)
    files["llm"] = _tensors_file(tmp_path / "qwen.safetensors", "model.x")
    with pytest.raises(ModelLoadError, match="takes no llm"):
        components_from_files(files)


def test_a_file_of_another_format_or_missing_is_named(tmp_path: Path) -> None:
    files = _flux_files(tmp_path)
    with pytest.raises(ModelLoadError, match=r"vae .*ae\.ckpt must be a \.safetensors or \.gguf"):
        components_from_files({**files, "vae": tmp_path / "ae.ckpt"})
    with pytest.raises(ModelLoadError, match=r"clip_l file .*gone\.safetensors does not exist"):
        components_from_files({**files, "clip_l": tmp_path / "gone.safetensors"})


def test_a_diffusion_model_of_no_family_asks_for_the_family(tmp_path: Path) -> None:
    files = _flux_files(tmp_path)
    files["diffusion_model"] = _tensors_file(tmp_path / "unet.safetensors", "input_blocks.0")
    with pytest.raises(ModelLoadError, match=r'unet\.safetensors is not one .*"family"'):
        components_from_files(files)
    given = components_from_files(files, family="flux1")  # named, it is taken at its word
    assert given.family == "flux1"


def test_a_manifest_names_files_relative_to_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "flux-schnell"
    files = _flux_files(folder / "parts")
    (folder / "tok").mkdir()
    manifest = {role: f"parts/{path.name}" for role, path in files.items()}
    manifest["tokenizers"] = "tok"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    components = read_manifest(folder)
    assert components.files["vae"] == folder / "parts" / "ae.safetensors"
    assert components.tokenizers == folder / "tok"
    assert components.source == folder / MANIFEST_NAME


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"unet": "x.safetensors"}', "unknown field 'unet'"),
        ('{"vae": 3}', "vae must be a non-empty string"),
        ('{"family": "sdxl", "diffusion_model": "flux.safetensors"}', "family 'sdxl' is none"),
        ('{"diffusion_model": "flux.safetensors", "tokenizers": "none"}', "needs"),
    ],
)
def test_a_bad_manifest_is_refused_naming_it(tmp_path: Path, content: str, message: str) -> None:
    _flux_files(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ModelLoadError, match=message) as caught:
        read_manifest(tmp_path)
    assert MANIFEST_NAME in str(caught.value)


def test_the_catalog_lists_a_manifest_folder_and_sees_it_edited(tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = models / "fluxy"
    files = _flux_files(folder)
    manifest = folder / MANIFEST_NAME
    manifest.write_text(json.dumps({role: path.name for role, path in files.items()}))
    (models / "broken").mkdir()
    (models / "broken" / MANIFEST_NAME).write_text("{}")
    catalog = ModelCatalog(models)
    entries = {entry.id: entry for entry in catalog.entries()}
    assert set(entries) == {"builtin", "fluxy"}  # the broken one is skipped (and logged)
    fluxy = entries["fluxy"]
    assert (fluxy.format, fluxy.architecture) == ("components", "flux1")
    assert fluxy.path == files["diffusion_model"]
    assert fluxy.components is not None
    assert fluxy.components.names["vae"] == "ae.safetensors"
    # edited in place (the folder's own stamp does not change): the catalog reads it again
    stamp = manifest.stat()
    manifest.write_text(json.dumps({"family": "flux1", **{r: p.name for r, p in files.items()}}))
    os.utime(manifest, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10_000_000))
    assert catalog.find("fluxy") is not None
    (folder / MANIFEST_NAME).write_text('{"vae": "ae.safetensors"}')
    os.utime(manifest, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 20_000_000))
    assert [entry.id for entry in catalog.entries()] == ["builtin"]


def _flag_settings(files: dict[str, Path]) -> Settings:
    return dataclasses.replace(Settings(), **files)  # type: ignore[arg-type]


def test_the_flags_make_the_default_model_named_by_the_diffusion_file(tmp_path: Path) -> None:
    files = _flux_files(tmp_path)
    settings = _flag_settings(files)
    catalog = model_catalog(settings)
    assert catalog.default_id == "flux"
    entry = catalog.find(None)
    assert entry is not None
    assert entry.format == "components"


def test_the_flags_and_model_together_are_refused(tmp_path: Path) -> None:
    files = _flux_files(tmp_path)
    with pytest.raises(SettingsError, match="--model and --diffusion-model"):
        flag_components(dataclasses.replace(_flag_settings(files), model=tmp_path))
    with pytest.raises(SettingsError, match=r"--diffusion-model, --vae.*needs"):
        flag_components(Settings(diffusion_model=files["diffusion_model"], vae=files["vae"]))
    assert flag_components(Settings()) is None


def test_a_gguf_header_gives_its_tensor_names(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "flux.gguf"
    writer = GGUFWriter(str(path), "flux")
    writer.add_tensor(SIGNATURE["flux1"], np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert detect_family(tensor_names(path)) == "flux1"
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 3)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        tensor_names(tmp_path / "junk.gguf")


def test_a_comfyui_checkpoint_is_components_of_one_file_under_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "sd35.safetensors"
    keys = [
        "model.diffusion_model." + SIGNATURE["sd3"],
        "first_stage_model.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.x",
        "text_encoders.clip_g.transformer.text_model.x",
        "text_encoders.t5xxl.transformer.encoder.x",
    ]
    components = single_file_components(path, "sd3", keys)
    assert set(components.files.values()) == {path}
    assert components.prefixes == {
        "diffusion_model": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_l": "text_encoders.clip_l.transformer.",
        "clip_g": "text_encoders.clip_g.transformer.",
        "t5xxl": "text_encoders.t5xxl.transformer.",
    }


def test_a_file_of_the_diffusion_model_alone_asks_for_the_other_parts(tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    with pytest.raises(ModelLoadError, match=r"flux1-dev\.safetensors .* without its vae, clip_l"):
        single_file_components(path, "flux1", [SIGNATURE["flux1"]])
    partial = ["model.diffusion_model." + SIGNATURE["flux1"], "vae.decoder.conv_in.weight"]
    with pytest.raises(ModelLoadError, match="without its clip_l, t5xxl: give them"):
        single_file_components(path, "flux1", partial)


def test_the_catalog_names_a_flow_single_file_by_its_family(tmp_path: Path) -> None:
    _tensors_file(tmp_path / "chroma-hd.safetensors", SIGNATURE["chroma"], SIGNATURE["flux1"])
    entries = {entry.id: entry for entry in ModelCatalog(tmp_path).entries()}
    assert (entries["chroma-hd"].format, entries["chroma-hd"].architecture) == (
        "safetensors",
        "chroma",
    )


def test_an_fp8_file_is_read_up_to_the_compute_dtype(tmp_path: Path) -> None:
    from diffusiond.backends.component_read import read_component

    values = torch.tensor([0.5, -1.5, 3.0, 448.0])
    path = tmp_path / "qwen_image_fp8_e4m3fn.safetensors"
    save_file({"a": values.to(torch.float8_e4m3fn), "b": values.to(torch.float8_e5m2)}, str(path))
    read = read_component(path, torch.bfloat16)
    assert read["a"].dtype == torch.bfloat16
    assert torch.equal(read["a"], values.to(torch.bfloat16))  # each value exact in e4m3
    assert torch.equal(read["b"], values.to(torch.float8_e5m2).to(torch.bfloat16))
