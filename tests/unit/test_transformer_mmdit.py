"""SD 3.x, Z-Image and Qwen-Image diffusion models loaded from files in their original names.

Each tiny transformer is written as a user would download it (Stability's, Tongyi's or
Qwen's names, perhaps under ComfyUI's prefix, as .safetensors or a city96 GGUF), read back
by read_component and built by load_mmdit_layout: the same weights, the same config and the
same output as the module it was written from (exact at float32 from safetensors; GGUF
within its rounding), and a ModelLoadError naming the file for a file that is not such a
model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusiond.backends.component_read import read_component
from diffusiond.backends.components import detect_family, tensor_names
from diffusiond.backends.transformer_mmdit import load_mmdit_layout
from diffusiond.errors import ModelLoadError
from tests.support.mmdit_layout import (
    COMFY_PREFIX,
    original_layout,
    tiny_transformer,
    write_diffusion_model,
)

# case -> the family it belongs to; "sd35m" is SD 3.5 medium-shaped (qk norms, attn2)
CASES = {"sd3": "sd3", "sd35m": "sd3", "zimage": "zimage", "qwenimage": "qwenimage"}
# The config fields the loader reads from the tensors, per family.
CONFIG_FIELDS = {
    "sd3": (
        "patch_size",
        "in_channels",
        "out_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "pos_embed_max_size",
        "dual_attention_layers",
        "qk_norm",
    ),
    "zimage": (
        "all_patch_size",
        "all_f_patch_size",
        "in_channels",
        "dim",
        "n_layers",
        "n_refiner_layers",
        "n_heads",
        "n_kv_heads",
        "qk_norm",
        "cap_feat_dim",
        "axes_dims",
        "rope_theta",
    ),
    "qwenimage": (
        "patch_size",
        "in_channels",
        "out_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "guidance_embeds",
        "axes_dims_rope",
    ),
}
# Largest |difference| allowed, as a share of the reference's largest |value|: F16 rounds
# each weight to 11 significant bits, Q8_0 to 8 bits per 32-value block.
TOLERANCE = {"gguf-f16": 2e-3, "gguf-q8_0": 2e-2}
_SUFFIX = {"safetensors": ".safetensors", "gguf-f16": ".gguf", "gguf-q8_0": ".gguf"}


@pytest.fixture(scope="module")
def modules() -> dict[str, Any]:
    torch.set_num_threads(1)
    return {case: tiny_transformer(case) for case in CASES}


def _inputs(family: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if family == "sd3":
        return {
            "hidden_states": noise(1, 16, 8, 8),
            "encoder_hidden_states": noise(1, 5, 64),
            "pooled_projections": noise(1, 64),
            "timestep": torch.tensor([500.0]),
        }
    if family == "zimage":
        return {"x": [noise(16, 1, 8, 8)], "t": torch.tensor([0.5]), "cap_feats": [noise(5, 16)]}
    return {
        "hidden_states": noise(1, 16, 64),
        "encoder_hidden_states": noise(1, 5, 16),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, 4, 4)],
    }


def _output(module: Any, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = module(**_inputs(family), return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out


def _write(tmp_path: Path, case: str, module: Any, fmt: str, *, comfy: bool = False) -> Path:
    path = tmp_path / f"{case}{'-comfy' if comfy else ''}{_SUFFIX[fmt]}"
    return write_diffusion_model(path, CASES[case], module, fmt, comfy=comfy)


def _load(path: Path, family: str, dtype: torch.dtype = torch.float32) -> Any:
    return load_mmdit_layout(family, read_component(path, dtype), dtype, path)


@pytest.mark.parametrize("comfy", [False, True], ids=["plain", "comfy"])
@pytest.mark.parametrize("case", CASES)
def test_safetensors_load_is_exact(
    case: str, comfy: bool, modules: dict[str, Any], tmp_path: Path
) -> None:
    family, original = CASES[case], modules[case]
    loaded = _load(_write(tmp_path, case, original, "safetensors", comfy=comfy), family)
    assert type(loaded) is type(original)
    want, got = original.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    for field in CONFIG_FIELDS[family]:
        assert loaded.config[field] == original.config[field], field
    want_output = _output(original, family)
    assert want_output.abs().max() > 0
    assert torch.equal(_output(loaded, family), want_output)


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0"])
@pytest.mark.parametrize("case", CASES)
def test_gguf_load_is_close(case: str, fmt: str, modules: dict[str, Any], tmp_path: Path) -> None:
    family, original = CASES[case], modules[case]
    loaded = _load(_write(tmp_path, case, original, fmt), family)
    got = loaded.state_dict()
    for name, tensor in original.state_dict().items():
        assert got[name].shape == tensor.shape, name
        limit = TOLERANCE[fmt] * max(tensor.abs().max().item(), 1e-6)
        assert (got[name] - tensor).abs().max().item() <= limit, name
    want = _output(original, family)
    assert (_output(loaded, family) - want).abs().max() <= TOLERANCE[fmt] * want.abs().max()


@pytest.mark.parametrize("fmt", ["safetensors", "gguf-q8_0"])
@pytest.mark.parametrize("comfy", [False, True], ids=["plain", "comfy"])
@pytest.mark.parametrize("case", CASES)
def test_family_detected_from_file(
    case: str, comfy: bool, fmt: str, modules: dict[str, Any], tmp_path: Path
) -> None:
    names = tensor_names(_write(tmp_path, case, modules[case], fmt, comfy=comfy))
    assert any(name.startswith(COMFY_PREFIX) for name in names) is comfy
    assert detect_family(names) == CASES[case]


# A tensor per case whose name the converter keeps: the module's parameter is that tensor.
KEPT = {
    "sd3": ("context_embedder.weight", "context_embedder.weight"),
    "sd35m": ("context_embedder.weight", "context_embedder.weight"),
    "zimage": ("x_pad_token", "x_pad_token"),
    "qwenimage": ("img_in.weight", "img_in.weight"),
}


@pytest.mark.parametrize("case", CASES)
def test_built_in_dtype_with_tensors_assigned(
    case: str, modules: dict[str, Any], tmp_path: Path
) -> None:
    path = _write(tmp_path, case, modules[case], "safetensors", comfy=True)
    state = read_component(path, torch.bfloat16)
    in_file, in_module = KEPT[case]
    pointer = state[COMFY_PREFIX + in_file].data_ptr()
    loaded = load_mmdit_layout(CASES[case], state, torch.bfloat16, path)
    assert loaded.get_parameter(in_module).data_ptr() == pointer  # assigned, not copied
    assert not state  # taken out of the caller's dict
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert {tensor.dtype for tensor in tensors} == {torch.bfloat16}
    assert not any(tensor.is_meta for tensor in tensors)
    want = modules[case].state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[name].to(torch.bfloat16)), name


# Names the published checkpoints have (sd3.5_medium, z_image_turbo, qwen_image), none of
# which the converters would take if the writer kept diffusers' names.
ORIGINAL_NAMES = {
    "sd3": (
        "pos_embed",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "y_embedder.mlp.2.bias",
        "context_embedder.weight",
        "joint_blocks.0.x_block.attn.qkv.weight",
        "joint_blocks.0.context_block.attn.qkv.bias",
        "joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
    ),
    "sd35m": (
        "joint_blocks.0.x_block.attn.ln_q.weight",
        "joint_blocks.0.context_block.attn.ln_k.weight",
        "joint_blocks.0.x_block.attn2.qkv.weight",
        "joint_blocks.0.x_block.attn2.proj.bias",
        "joint_blocks.0.context_block.mlp.fc2.weight",
        "joint_blocks.1.x_block.mlp.fc1.weight",
    ),
    "zimage": (
        "x_pad_token",
        "cap_pad_token",
        "x_embedder.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
        "cap_embedder.0.weight",
        "cap_embedder.1.weight",
        "t_embedder.mlp.0.weight",
        "layers.0.attention.qkv.weight",
        "layers.0.attention.out.weight",
        "layers.0.attention.q_norm.weight",
        "layers.0.attention.k_norm.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.adaLN_modulation.0.weight",
        "noise_refiner.0.attention.qkv.weight",
        "context_refiner.0.attention.out.weight",
    ),
    "qwenimage": (
        "img_in.weight",
        "txt_norm.weight",
        "txt_in.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.img_mod.1.weight",
        "norm_out.linear.weight",
        "proj_out.weight",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_written_in_original_names(case: str, modules: dict[str, Any]) -> None:
    names = set(original_layout(CASES[case], modules[case]))
    assert set(ORIGINAL_NAMES[case]) <= names
    if case != "qwenimage":
        assert not [name for name in names if ".to_q." in name or name.startswith("all_")]


def test_zimage_in_diffusers_names_loads(modules: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    original = modules["zimage"]
    path = tmp_path / "zimage-diffusers.safetensors"
    save_file({name: t.contiguous() for name, t in original.state_dict().items()}, str(path))
    loaded = _load(path, "zimage")
    assert torch.equal(_output(loaded, "zimage"), _output(original, "zimage"))


def test_zimage_pad_tokens_loaded(modules: dict[str, Any], tmp_path: Path) -> None:
    original = modules["zimage"]
    loaded = _load(_write(tmp_path, "zimage", original, "gguf-q8_0"), "zimage")
    for name in ("x_pad_token", "cap_pad_token"):
        assert torch.equal(getattr(loaded, name), getattr(original, name))  # F32 in the file


def test_whole_checkpoint_keeps_the_prefixed_model(modules: dict[str, Any], tmp_path: Path) -> None:
    """Stability's files carry the VAE beside the diffusion model; it is left out."""
    from safetensors.torch import save_file

    tensors = {COMFY_PREFIX + k: v for k, v in original_layout("sd3", modules["sd3"]).items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 16, 3, 3)
    path = tmp_path / "sd3_with_vae.safetensors"
    save_file(tensors, str(path))
    assert _load(path, "sd3").config["num_layers"] == 1


def _write_changed(
    tmp_path: Path, case: str, module: Any, change: Mapping[str, torch.Tensor | None]
) -> Path:
    from safetensors.torch import save_file

    tensors = original_layout(CASES[case], module)
    for name, tensor in change.items():
        assert name in tensors or tensor is not None, name
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    path = tmp_path / f"bad-{case}.safetensors"
    save_file(tensors, str(path))
    return path


# (case, a tensor of the case's file in its original names, what the message names)
MISSING = [
    ("sd3", "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight"),
    ("sd35m", "joint_blocks.0.x_block.attn2.ln_q.weight", "joint_blocks.0.x_block.attn2.ln_q"),
    ("sd3", "final_layer.linear.bias", "final_layer.linear.bias"),
    ("zimage", "layers.0.attention.qkv.weight", "layers.0.attention.to_k.weight"),
    ("zimage", "cap_pad_token", "cap_pad_token"),
    ("zimage", "noise_refiner.0.feed_forward.w2.weight", "noise_refiner.0.feed_forward.w2"),
    ("qwenimage", "transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.attn.to_k"),
    ("qwenimage", "norm_out.linear.bias", "norm_out.linear.bias"),
]


@pytest.mark.parametrize(("case", "name", "named"), MISSING)
def test_missing_tensor_named(
    case: str, name: str, named: str, modules: dict[str, Any], tmp_path: Path
) -> None:
    path = _write_changed(tmp_path, case, modules[case], {name: None})
    with pytest.raises(ModelLoadError, match=f"{re.escape(named)}.* is missing") as caught:
        _load(path, CASES[case])
    assert str(path) in str(caught.value)


WRONG_SHAPE = [
    ("sd3", "y_embedder.mlp.2.weight", (64, 32), "text_embedder.linear_2.weight"),
    ("sd35m", "joint_blocks.1.x_block.mlp.fc2.weight", (64, 200), "blocks.1.ff.net.2.weight"),
    ("zimage", "layers.0.feed_forward.w1.weight", (300, 128), "layers.0.feed_forward.w1.weight"),
    ("zimage", "x_pad_token", (1, 64), "x_pad_token"),
    ("qwenimage", "txt_norm.weight", (8,), "txt_norm.weight"),
]


@pytest.mark.parametrize("row", WRONG_SHAPE, ids=[f"{row[0]}-{row[1]}" for row in WRONG_SHAPE])
def test_wrong_shape_named(
    row: tuple[str, str, tuple[int, ...], str], modules: dict[str, Any], tmp_path: Path
) -> None:
    case, name, shape, named = row
    path = _write_changed(tmp_path, case, modules[case], {name: torch.zeros(shape)})
    with pytest.raises(ModelLoadError, match=f"{re.escape(named)}.* has shape") as caught:
        _load(path, CASES[case])
    assert str(path) in str(caught.value)


def test_unexpected_tensor_named(modules: dict[str, Any], tmp_path: Path) -> None:
    for case in ("sd3", "zimage", "qwenimage"):
        extra = {"extra_head.weight": torch.zeros(2)}
        path = _write_changed(tmp_path, case, modules[case], extra)
        with pytest.raises(ModelLoadError, match=r"extra_head\.weight.* no part") as caught:
            _load(path, CASES[case])
        assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("family", "case"), [("sd3", "zimage"), ("zimage", "qwenimage"), ("qwenimage", "sd3")]
)
def test_other_familys_file_refused(
    family: str, case: str, modules: dict[str, Any], tmp_path: Path
) -> None:
    path = _write(tmp_path, case, modules[case], "safetensors")
    with pytest.raises(ModelLoadError, match=r"is not a .* diffusion model") as caught:
        _load(path, family)
    assert str(path) in str(caught.value)


def test_foreign_file_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelLoadError, match="no family's tensors") as caught:
        _load(path, "sd3")
    assert str(path) in str(caught.value)
