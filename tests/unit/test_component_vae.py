"""Split-component VAEs: each family's released layout, and diffusers names, read back exactly.

Tiny random VAEs are written as FLUX.1's/SD3's ldm-named ae.safetensors, FLUX.2's (quant
convs inside, a batch norm), Qwen-Image's Wan 2.1 names, or diffusers names
(tests/support/encoder_files.py), and loaded by component_vae.py: the weights must come
back bit for bit, and every wrong file be a ModelLoadError naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from diffusiond.backends.component_encoders import load_vae
from diffusiond.backends.component_read import read_component
from diffusiond.errors import ModelLoadError
from tests.support import encoder_files as files
from tests.support import encoder_models as models
from tests.support.families import _vae


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and diffusers' notes on tiny configs
        yield


# ---- VAEs -----------------------------------------------------------------------------------


def _qwen_vae() -> Any:
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _flux2_vae() -> Any:
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(  # FLUX.2's own has its quant convs, unlike the tiny family's
        latent_channels=32,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.bn.running_mean.uniform_(-1, 1)  # statistics a trained model has, not zeros/ones
    vae.bn.running_var.uniform_(0.5, 2)
    return vae


VAES = {
    "flux1": lambda: _vae(16),
    "chroma": lambda: _vae(16),
    "zimage": lambda: _vae(16),
    "sd3": lambda: _vae(16),
    "flux2": _flux2_vae,
    "qwenimage": _qwen_vae,
}
SCALING = {"flux1": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}


def _load_vae(family: str, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return load_vae(family, read_component(path, dtype), dtype, path)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("family", sorted(VAES))
def test_vae_round_trips(tmp_path: Path, family: str, layout: str) -> None:
    module = models.seeded(VAES[family])
    path = files.write_vae(tmp_path / "vae.safetensors", family, module, layout=layout)
    loaded = _load_vae(family, path)
    assert type(loaded) is type(module)
    models.assert_same_weights(module, loaded)
    if family in SCALING:
        scaling, shift = SCALING[family]
        assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (scaling, shift)
        assert loaded.config.norm_num_groups == 8  # the tiny widths' (8, 16): the gcd rule


def test_original_layouts_are_not_the_diffusers_names() -> None:
    flux = files.ldm_vae_state(_vae(16))
    assert "encoder.down.0.block.0.norm1.weight" in flux
    assert "decoder.up.0.block.0.conv1.weight" in flux
    assert "encoder.mid.attn_1.q.weight" in flux
    assert flux["encoder.mid.attn_1.q.weight"].ndim == 4
    flux2 = files.ldm_vae_state(_flux2_vae())
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_var"} <= set(
        flux2
    )
    wan = files.wan_vae_state(_qwen_vae())
    assert {"conv1.weight", "encoder.conv1.weight", "encoder.head.2.weight"} <= set(wan)
    assert "decoder.upsamples.2.resample.1.weight" in wan  # level 0: two residuals, then up
    assert "decoder.upsamples.3.shortcut.weight" in wan  # level 1 starts narrower


def test_vaes_decode_alike(tmp_path: Path) -> None:
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    flux = models.seeded(VAES["flux1"])
    loaded = _load_vae("flux1", files.write_vae(tmp_path / "f.safetensors", "flux1", flux))
    with torch.no_grad():
        assert torch.equal(flux.decode(latents).sample, loaded.decode(latents).sample)
    qwen = models.seeded(_qwen_vae)
    loaded = _load_vae("qwenimage", files.write_vae(tmp_path / "q.safetensors", "qwenimage", qwen))
    frames = latents[:, :, None]
    with torch.no_grad():
        assert torch.equal(qwen.decode(frames).sample, loaded.decode(frames).sample)
    # the published per-channel statistics, which no tensor records
    assert loaded.config.latents_mean[:2] == [-0.7571, -0.7089]
    assert loaded.config.latents_std[-1] == 1.9160


def test_vae_from_gguf_and_under_a_prefix(tmp_path: Path) -> None:
    module = models.seeded(VAES["flux1"])
    gguf = files.write_vae(tmp_path / "ae.gguf", "flux1", module)
    models.assert_same_weights(module, _load_vae("flux1", gguf))
    prefixed = {"first_stage_model." + k: v for k, v in files.ldm_vae_state(module).items()}
    save_file(prefixed, str(tmp_path / "p.safetensors"))
    models.assert_same_weights(module, _load_vae("flux1", tmp_path / "p.safetensors"))


def test_vae_in_half_precision_without_a_float32_copy(tmp_path: Path) -> None:
    module = models.seeded(VAES["sd3"])
    path = files.write_vae(tmp_path / "vae.safetensors", "sd3", module)
    loaded = _load_vae("sd3", path, torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    models.assert_same_weights(module.to(torch.bfloat16), loaded)


def _vae_error(tmp_path: Path, family: str, state: dict[str, torch.Tensor]) -> str:
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError) as caught:
        _load_vae(family, path)
    message = str(caught.value)
    assert str(path) in message
    assert message.startswith("vae ")
    return message


def test_vae_errors(tmp_path: Path) -> None:
    flux = files.ldm_vae_state(models.seeded(VAES["flux1"]))
    assert "names" in _vae_error(tmp_path, "flux1", {"model.weight": torch.zeros(2)})
    assert "no tensors" in _vae_error(tmp_path, "flux1", {})
    missing = {k: v for k, v in flux.items() if k != "decoder.up.1.block.0.conv2.bias"}
    assert "missing" in _vae_error(tmp_path, "flux1", missing)
    extra = {**flux, "decoder.spare.weight": torch.zeros(2)}
    assert "no place for" in _vae_error(tmp_path, "flux1", extra)
    wrong = {**flux, "decoder.up.1.block.0.conv2.bias": torch.zeros(3)}
    assert "wrong shape" in _vae_error(tmp_path, "flux1", wrong)
    assert "batch norm" in _vae_error(tmp_path, "flux2", flux)
    flux2 = files.ldm_vae_state(models.seeded(VAES["flux2"]))
    assert "FLUX.2" in _vae_error(tmp_path, "sd3", flux2)
    assert "Wan 2.1" in _vae_error(tmp_path, "qwenimage", flux)
    wan = files.wan_vae_state(models.seeded(_qwen_vae))
    assert "Qwen-Image" in _vae_error(tmp_path, "qwenimage", {"x.weight": torch.zeros(1)})
    del wan["conv2.weight"]
    assert "conv2.weight" in _vae_error(tmp_path, "qwenimage", wan)
