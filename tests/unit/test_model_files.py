"""Model formats and precision: single-file checkpoints, diffusers folders, --dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.diffusers_backend import DiffusersBackend, check_model_path
from diffusiond.backends.precision import cpu_flags, resolve_dtype
from diffusiond.backends.single_file import Checkpoint, clip_tokenizer, detect_architecture
from diffusiond.errors import ModelLoadError
from tests.support.model_files import tiny_model_files

SPEC = ImageSpec(
    prompt="a lighthouse",
    negative_prompt="fog",
    width=64,
    height=64,
    steps=2,
    cfg_scale=7.5,
    seed=1234,
    sampler="euler_a",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_model_files(tmp_path_factory.mktemp("home"))


def _backend(model: Path, dtype: str = "float32", config: Path | None = None) -> DiffusersBackend:
    backend = DiffusersBackend(
        model_path=model,
        home=model.parent,
        device="cpu",
        torch_threads=1,
        dtype=dtype,
        model_config=config,
    )
    backend.load()
    return backend


def _draw(backend: DiffusersBackend) -> np.ndarray:
    return np.asarray(backend.generate(SPEC, lambda *_: None, lambda: False))


def test_a_single_file_draws_the_same_image_as_its_diffusers_folder(
    tiny: tuple[Path, Path],
) -> None:
    folder, single_file = tiny
    from_folder = _backend(folder)
    from_file = _backend(single_file, config=folder)
    assert from_file.info().architecture == from_folder.info().architecture == "sd1"
    assert from_file.info().model == str(single_file)
    image = _draw(from_file)
    assert image.shape == (64, 64, 3)
    assert image.std() > 0
    np.testing.assert_array_equal(image, _draw(from_folder))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_dtype_asked_for_is_the_dtype_loaded(tiny: tuple[Path, Path], dtype: str) -> None:
    folder, single_file = tiny
    for model, config in ((folder, None), (single_file, folder)):
        backend = _backend(model, dtype, config)
        assert backend.info().dtype == dtype
        pipeline = backend._pipeline
        for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            assert {p.dtype for p in component.parameters()} == {getattr(torch, dtype)}
        assert _draw(backend).shape == (64, 64, 3)


def test_auto_dtype_follows_the_device_and_the_cpu() -> None:
    assert resolve_dtype("auto", "cpu", native_bf16=True) is torch.bfloat16
    assert resolve_dtype("auto", "cpu", native_bf16=False) is torch.float32
    assert resolve_dtype("auto", "cuda:0", native_bf16=True) is torch.float16
    assert resolve_dtype("float32", "cuda", native_bf16=True) is torch.float32
    assert resolve_dtype("float16", "cpu") is torch.float16
    flags = cpu_flags("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert "avx512_bf16" in flags
    assert cpu_flags("processor : 0\nFeatures : fp asimd bf16\n") >= {"bf16"}
    assert cpu_flags("nothing here") == frozenset()


def test_a_corrupt_file_is_refused_naming_it(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 100)
    with pytest.raises(ModelLoadError, match=r"not a readable \.safetensors") as caught:
        _backend(garbage)
    assert str(garbage) in caught.value.message

    truncated = tmp_path / "truncated.safetensors"
    data = tiny[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as caught:
        _backend(truncated, config=tiny[0])
    assert str(truncated) in caught.value.message

    pickle = tmp_path / "garbage.ckpt"
    pickle.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ModelLoadError, match=r"not a readable \.ckpt") as caught:
        _backend(pickle)
    assert str(pickle) in caught.value.message


def test_a_file_of_another_kind_is_refused_naming_it(tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(lora))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint") as caught:
        _backend(lora)
    assert str(lora) in caught.value.message
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a \.safetensors, \.ckpt or \.gguf"):
        check_model_path(text)


def test_weights_that_do_not_fit_the_architecture_are_refused_naming_it(
    tiny: tuple[Path, Path],
) -> None:
    # The tiny SD-1-shaped file against the shipped SD 1.5 config: every shape differs.
    with pytest.raises(ModelLoadError, match="do not fit the sd1 configuration") as caught:
        _backend(tiny[1])
    assert str(tiny[1]) in caught.value.message


def _fake_checkpoint(path: Path, keys: list[str], in_channels: int = 4) -> Checkpoint:
    tensors = {key: torch.zeros(1) for key in keys}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, in_channels, 1, 1)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    save_file(tensors, str(path))
    return Checkpoint(path)


@pytest.mark.parametrize(
    ("text_key", "architecture"),
    [
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
        ("cond_stage_model.model.ln_final.weight", "sd2"),
        ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ],
)
def test_the_architecture_is_read_from_the_keys(
    tmp_path: Path, text_key: str, architecture: str
) -> None:
    checkpoint = _fake_checkpoint(tmp_path / "m.safetensors", [text_key])
    assert detect_architecture(checkpoint).name == architecture


def test_unsupported_variants_are_named(tmp_path: Path) -> None:
    refiner = _fake_checkpoint(
        tmp_path / "refiner.safetensors", ["conditioner.embedders.0.model.ln_final.weight"]
    )
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        detect_architecture(refiner)
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    upscaler = _fake_checkpoint(tmp_path / "x4.safetensors", [text_key], in_channels=7)
    with pytest.raises(ModelLoadError, match="7 input channels"):
        detect_architecture(upscaler)
    inpainting = _fake_checkpoint(tmp_path / "inpaint.safetensors", [text_key], in_channels=9)
    assert detect_architecture(inpainting).name == "sd1"  # inpainting models load (#16)
    unknown = _fake_checkpoint(tmp_path / "unknown.safetensors", ["something.else"])
    with pytest.raises(ModelLoadError, match="unknown architecture") as caught:
        detect_architecture(unknown)
    assert str(tmp_path / "unknown.safetensors") in caught.value.message


def test_the_shipped_clip_tokenizer_is_clips() -> None:
    tokenizer = clip_tokenizer("<|endoftext|>")
    assert len(tokenizer) == 49408
    # openai/clip-vit-large-patch14's ids for this prompt
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == 49407
    assert clip_tokenizer("!").pad_token_id == 0


def test_large_images_are_decoded_in_tiles(tiny: tuple[Path, Path]) -> None:
    backend = _backend(tiny[0])
    vae = backend._pipeline.vae
    tiled_sizes: list[tuple[int, ...]] = []
    tiled_decode = vae.tiled_decode

    def spy(latents: torch.Tensor, **kwargs: object) -> object:
        tiled_sizes.append(tuple(latents.shape[-2:]))
        return tiled_decode(latents, **kwargs)

    vae.tiled_decode = spy
    generate = backend.generate
    small = generate(SPEC, lambda *_: None, lambda: False)
    large_spec = ImageSpec(**{**SPEC.__dict__, "width": 832, "height": 768, "steps": 1})
    large = generate(large_spec, lambda *_: None, lambda: False)
    assert small.size == (64, 64)
    assert large.size == (832, 768)
    assert tiled_sizes == [(96, 104)]
    assert np.asarray(large).std() > 0
