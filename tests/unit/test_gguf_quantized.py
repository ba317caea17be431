"""A GGUF diffusion model read with its quantized linear weights kept (--gguf-weights):
each flow family's tiny transformer written as city96-style Q8_0 files, loaded both
ways. Kept, every Linear whose file tensor is Q8_0 is diffusers' GGUFLinear over a
GGUFParameter (raw blocks, not dense values) and the output is the dequantized load's
within the rounding of diffusers' Q8_0 dequantizer (it multiplies in float16, the gguf
package in float32); the default read and load are unchanged; and the auto rule."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusiond.backends.component_read import read_component
from diffusiond.backends.gguf_weights import (
    AUTO_SHARE,
    available_memory,
    choose,
    dequantized_size,
    is_quantized,
    keep_quantized,
)
from diffusiond.backends.transformer_flux import load_flux_layout
from diffusiond.backends.transformer_mmdit import load_mmdit_layout
from diffusiond.errors import SettingsError
from diffusiond.settings import load_settings
from tests.support import flux_layout, mmdit_layout
from tests.unit import test_transformer_flux as flux_tests
from tests.unit import test_transformer_mmdit as mmdit_tests

# Largest |difference| between the two loads' outputs (values of order 1): a float16
# product of the block's scale and an int8 is within 2**-11 of the float32 one.
_TOLERANCE = 2e-3
_FLUX_LAYOUT = ("flux1", "chroma", "flux2")
_FAMILIES = (*_FLUX_LAYOUT, "zimage", "sd3", "qwenimage")


@functools.cache
def _module(family: str) -> Any:
    torch.set_num_threads(1)
    if family in _FLUX_LAYOUT:
        return flux_layout.tiny_transformer(family)
    return mmdit_layout.tiny_transformer(family)


def _written(folder: Path, family: str) -> Path:
    writer = flux_layout if family in _FLUX_LAYOUT else mmdit_layout
    path = folder / f"{family}-q8_0.gguf"
    written: Path = writer.write_diffusion_model(path, family, _module(family), "gguf-q8_0")
    return written


def _load(path: Path, family: str, *, keep: bool) -> Any:
    dtype = torch.float32
    tensors = read_component(path, dtype, keep_quantized=keep)
    loader = load_flux_layout if family in _FLUX_LAYOUT else load_mmdit_layout
    return loader(family, tensors, dtype, path)


def _output(module: Any, family: str) -> torch.Tensor:
    if family in _FLUX_LAYOUT:
        with torch.no_grad():
            out: torch.Tensor = module(**flux_tests._inputs(family, module))[0]
        return out
    return mmdit_tests._output(module, family)


def _linears(module: Any) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family", _FAMILIES)
def test_kept_weights_are_gguf_linears(family: str, tmp_path: Path) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear
    from gguf.constants import GGMLQuantizationType

    loaded = _load(_written(tmp_path, family), family, keep=True)
    linears = _linears(loaded)
    kept = {n for n, m in linears.items() if isinstance(m, GGUFLinear)}
    assert kept, "no Linear kept its Q8_0 weight"
    for name in kept:
        weight: Any = linears[name].weight
        assert is_quantized(weight)
        assert weight.dtype == torch.uint8
        assert weight.quant_type == GGMLQuantizationType.Q8_0
        assert tuple(weight.quant_shape) == (
            linears[name].out_features,
            linears[name].in_features,
        )
    dense = [m.weight for n, m in linears.items() if n not in kept]
    assert all(w.is_floating_point() and not is_quantized(w) for w in dense)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


@pytest.mark.parametrize("family", _FAMILIES)
def test_kept_output_matches_the_dequantized_load(family: str, tmp_path: Path) -> None:
    path = _written(tmp_path, family)
    dequantized = _output(_load(path, family, keep=False), family)
    kept = _output(_load(path, family, keep=True), family)
    assert kept.shape == dequantized.shape
    assert torch.isfinite(kept).all()
    assert (kept - dequantized).abs().max().item() <= _TOLERANCE


@pytest.mark.parametrize("family", ["flux1", "zimage"])
def test_the_default_read_and_load_are_dense(family: str, tmp_path: Path) -> None:
    path = _written(tmp_path, family)
    tensors = read_component(path, torch.float32)
    assert not any(is_quantized(t) for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    loaded = _load(path, family, keep=False)
    assert all(type(m) is torch.nn.Linear for m in _linears(loaded).values())
    assert not choose("dequantize", path, torch.bfloat16)
    assert choose("quantized", path, torch.bfloat16)


def test_dequantized_size_counts_the_quantized_tensors(tmp_path: Path) -> None:
    from diffusiond.backends.gguf_file import QUANTIZED_TYPES, GgufFile

    path = _written(tmp_path, "flux1")
    quantized = [t for t in GgufFile(path).tensors.values() if t.kind in QUANTIZED_TYPES]
    values = sum(torch.Size(t.shape).numel() for t in quantized)
    assert values > 0
    assert dequantized_size(path, torch.bfloat16) == 2 * values
    assert dequantized_size(path, torch.float32) == 4 * values
    safetensors = tmp_path / "model.safetensors"
    assert dequantized_size(safetensors, torch.bfloat16) == 0  # not opened: not a GGUF
    assert not choose("quantized", safetensors, torch.bfloat16)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    assert dequantized_size(garbage, torch.bfloat16) == 0  # read_component names the fault
    assert not choose("quantized", garbage, torch.bfloat16)


@pytest.mark.parametrize(
    ("setting", "needed", "available", "keep"),
    [
        ("dequantize", 10**12, 1, False),
        ("quantized", 1, 10**12, True),
        ("auto", 24 * 10**9, 32 * 10**9, True),  # FLUX.1 in bf16, 32 GB free: keep
        ("auto", 24 * 10**9, 64 * 10**9, False),  # 64 GB free: dequantize
        ("auto", int(AUTO_SHARE * 1000), 1000, False),  # exactly the share: it fits
        ("auto", int(AUTO_SHARE * 1000) + 1, 1000, True),
        ("auto", 1, None, True),  # unknown free memory: the safe side
    ],
)
def test_keep_rule(setting: str, needed: int, available: int | None, keep: bool) -> None:
    assert keep_quantized(setting, needed, available) is keep


def test_keep_rule_refuses_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="gguf_weights"):
        keep_quantized("q8", 1, 1)


def test_available_memory_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert available_memory(meminfo) == 8_000_000 * 1024
    meminfo.write_text("MemTotal:       16000000 kB\n")
    assert available_memory(meminfo) is None
    assert available_memory(tmp_path / "absent") is None


def test_gguf_weights_setting() -> None:
    assert load_settings({}, {}).gguf_weights == "auto"
    env = {"DIFFUSIOND_GGUF_WEIGHTS": "dequantize"}
    assert load_settings(env, {}).gguf_weights == "dequantize"
    assert load_settings(env, {"gguf_weights": "quantized"}).gguf_weights == "quantized"
    with pytest.raises(SettingsError, match="GGUF_WEIGHTS"):
        load_settings({"DIFFUSIOND_GGUF_WEIGHTS": "q4"}, {})


def test_build_pipeline_keeps_them_only_when_asked(tmp_path: Path) -> None:
    """The FLUX.1 pipeline from components (a Q8_0 diffusion model): `quantized` puts
    GGUFLinears in its transformer and draws the dequantized pipeline's picture within
    the tolerance; the default puts none."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from diffusiond.backends.component_pipeline import build_pipeline
    from diffusiond.backends.components import read_manifest
    from tests.support.component_models import component_folder

    components = read_manifest(component_folder(tmp_path, "flux1", fmt="gguf-q8_0"))
    pictures = []
    for keyword in ({}, {"gguf_weights": "quantized"}):
        pipeline = build_pipeline(components, torch.float32, **keyword)
        pipeline.set_progress_bar_config(disable=True)
        kept = sum(isinstance(m, GGUFLinear) for m in pipeline.transformer.modules())
        assert (kept > 0) is bool(keyword)
        generator = torch.Generator().manual_seed(1)
        pictures.append(
            pipeline(
                prompt="a cat",
                num_inference_steps=2,
                height=64,
                width=64,
                generator=generator,
                output_type="pt",
            ).images
        )
    assert (pictures[0] - pictures[1]).abs().max().item() <= _TOLERANCE


def test_a_kept_tensor_of_the_wrong_shape_names_it(tmp_path: Path) -> None:
    """Shapes are checked as the values' (not the blocks' bytes): a Q8_0 weight one block
    too wide is a ModelLoadError naming the file, the tensor and both shapes."""
    from gguf.constants import GGMLQuantizationType

    from diffusiond.errors import ModelLoadError

    tensors = mmdit_layout.original_layout("sd3", _module("sd3"))
    name = "joint_blocks.0.x_block.attn.proj.weight"
    rows, columns = tensors[name].shape
    tensors[name] = torch.zeros(rows, columns + 32)
    path = tmp_path / "wide.gguf"
    mmdit_layout.write_gguf(path, "sd3", tensors, GGMLQuantizationType.Q8_0)
    with pytest.raises(ModelLoadError) as caught:
        _load(path, "sd3", keep=True)
    message = str(caught.value)
    assert str(path) in message
    assert "transformer_blocks.0.attn.to_out.0.weight" in message
    assert f"({rows}, {columns + 32})" in message
    assert f"({rows}, {columns})" in message
