"""FLUX.1 (dev, schnell), Chroma and FLUX.2 klein diffusion models from their original-layout
files: a tiny diffusers transformer is written as Black Forest Labs / city96 / ComfyUI lay
such a file out, read back with `read_component` and built by `load_flux_layout`; the
weights, the config and the output must be the original module's."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusiond.backends.component_pipeline import scheduler_defaults
from diffusiond.backends.component_read import read_component
from diffusiond.backends.components import detect_family, tensor_names
from diffusiond.backends.transformer_flux import load_flux_layout
from diffusiond.errors import ModelLoadError
from tests.support.flux_layout import (
    COMFY_PREFIX,
    FAMILIES,
    FORMATS,
    as_stored,
    original_layout,
    tiny_transformer,
    write_diffusion_model,
)

# Largest |difference| of the output (its values are of order 1) from the original module's
# when the weights went through the file type: F16 rounds to 11 bits, Q8_0 to 8 per block.
_OUTPUT_TOLERANCE = {"safetensors": 0.0, "gguf-f16": 2e-3, "gguf-q8_0": 3e-2}


def _family(variant: str) -> str:
    return "flux1" if variant.startswith("flux1") else variant


@functools.cache
def _module(variant: str) -> Any:
    return tiny_transformer(variant)


def _written(folder: Path, variant: str, fmt: str, *, comfy: bool = False) -> Path:
    suffix = ".safetensors" if fmt == "safetensors" else ".gguf"
    path = folder / f"{variant}-{fmt}{'-comfy' if comfy else ''}{suffix}"
    return write_diffusion_model(path, _family(variant), _module(variant), fmt, comfy=comfy)


def _loaded(path: Path, variant: str, dtype: torch.dtype = torch.float32) -> Any:
    return load_flux_layout(_family(variant), read_component(path, dtype), dtype, path)


def _inputs(variant: str, module: Any) -> dict[str, Any]:
    """A fixed input: 16 image tokens, 8 text tokens, one timestep (and guidance for dev)."""
    config = module.config
    generator = torch.Generator().manual_seed(7)
    axes = 4 if variant == "flux2" else 3
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.stack(
            [
                torch.tensor([0] + [row, col] + [0] * (axes - 3))
                for row in range(4)
                for col in range(4)
            ]
        ).float(),
        "txt_ids": torch.zeros(8, axes),
        "return_dict": False,
    }
    if variant.startswith("flux1"):
        inputs["pooled_projections"] = torch.randn(
            1, config.pooled_projection_dim, generator=generator
        )
    if getattr(config, "guidance_embeds", False):
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def _output(module: Any, variant: str) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = module(**_inputs(variant, module))[0]
    return result


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", FAMILIES)
def test_a_written_model_loads_back_as_the_module_it_came_from(
    tmp_path: Path, variant: str, fmt: str
) -> None:
    original = _module(variant)
    loaded = _loaded(_written(tmp_path, variant, fmt), variant)
    assert type(loaded) is type(original)
    wanted = original.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(wanted)
    for name, tensor in wanted.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], as_stored(tensor, fmt)), name
    public = {key: value for key, value in original.config.items() if not key.startswith("_")}
    assert {key: loaded.config[key] for key in public} == public
    difference = (_output(loaded, variant) - _output(original, variant)).abs().max().item()
    assert difference <= _OUTPUT_TOLERANCE[fmt]


@pytest.mark.parametrize("variant", FAMILIES)
def test_a_comfyui_prefixed_gguf_loads_and_tells_its_family(tmp_path: Path, variant: str) -> None:
    path = _written(tmp_path, variant, "gguf-q8_0", comfy=True)
    names = tensor_names(path)
    assert all(name.startswith(COMFY_PREFIX) for name in names)
    assert detect_family(names) == _family(variant)
    loaded = _loaded(path, variant)
    assert torch.equal(
        loaded.x_embedder.weight, as_stored(_module(variant).x_embedder.weight, "gguf-q8_0")
    )


@pytest.mark.parametrize("variant", FAMILIES)
def test_the_family_is_read_from_the_original_names(tmp_path: Path, variant: str) -> None:
    assert detect_family(tensor_names(_written(tmp_path, variant, "safetensors"))) == _family(
        variant
    )


def test_dev_and_schnell_are_told_apart_by_the_guidance_embedder(tmp_path: Path) -> None:
    dev = _loaded(_written(tmp_path, "flux1", "safetensors"), "flux1")
    schnell = _loaded(_written(tmp_path, "flux1-schnell", "safetensors"), "flux1-schnell")
    assert dev.config.guidance_embeds is True
    assert schnell.config.guidance_embeds is False
    assert scheduler_defaults("flux1", dev)["use_dynamic_shifting"] is True
    assert scheduler_defaults("flux1", schnell)["use_dynamic_shifting"] is False


@pytest.mark.parametrize("variant", ["flux1", "chroma", "flux2"])
def test_the_weights_are_assigned_in_the_dtype_they_were_read_in(
    tmp_path: Path, variant: str
) -> None:
    path = _written(tmp_path, variant, "safetensors")
    tensors = read_component(path, torch.bfloat16)
    embedder = tensors["img_in.weight"]
    loaded = load_flux_layout(_family(variant), tensors, torch.bfloat16, path)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    assert loaded.x_embedder.weight.data_ptr() == embedder.data_ptr()  # not copied
    assert not tensors  # taken out as they were converted
    assert not loaded.training


def _rewritten(tmp_path: Path, variant: str, change: dict[str, torch.Tensor | None]) -> Path:
    """The variant's safetensors file with some tensors replaced (None: removed)."""
    from safetensors.torch import save_file

    state = original_layout(_family(variant), _module(variant))
    for name, tensor in change.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    path = tmp_path / f"{variant}-changed.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("variant", "removed", "named"),
    [
        ("flux1", "double_blocks.0.img_attn.qkv.bias", "double_blocks.0.img_attn.qkv.bias"),
        ("chroma", "distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.norms.0"),
        ("flux2", "single_blocks.0.linear2.weight", "single_transformer_blocks.0.attn.to_out"),
    ],
)
def test_a_missing_tensor_is_refused_naming_the_file_and_the_tensor(
    tmp_path: Path, variant: str, removed: str, named: str
) -> None:
    path = _rewritten(tmp_path, variant, {removed: None})
    with pytest.raises(ModelLoadError, match="missing") as caught:
        _loaded(path, variant)
    assert str(path) in caught.value.message
    assert named in caught.value.message


@pytest.mark.parametrize(
    ("variant", "tensor", "named"),
    [
        ("flux1", "double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
        ("flux1", "single_blocks.0.linear1.weight", "single_transformer_blocks.0.proj_mlp"),
        ("chroma", "txt_in.weight", "context_embedder.weight"),
        ("flux2", "single_blocks.0.linear1.weight", "single_transformer_blocks.0.attn.to_qkv"),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(
    tmp_path: Path, variant: str, tensor: str, named: str
) -> None:
    shape = original_layout(_family(variant), _module(variant))[tensor].shape
    path = _rewritten(tmp_path, variant, {tensor: torch.zeros(shape[0] + 32, shape[1])})
    with pytest.raises(ModelLoadError, match="shape") as caught:
        _loaded(path, variant)
    assert str(path) in caught.value.message
    assert named in caught.value.message


@pytest.mark.parametrize("variant", ["flux1", "flux2"])
def test_an_unknown_tensor_is_refused_naming_it(tmp_path: Path, variant: str) -> None:
    path = _rewritten(tmp_path, variant, {"double_blocks.0.img_attn.extra.weight": torch.ones(4)})
    with pytest.raises(ModelLoadError, match="unexpected") as caught:
        _loaded(path, variant)
    assert str(path) in caught.value.message
    assert "extra" in caught.value.message


def test_a_unet_is_refused_naming_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    unet = {
        f"{COMFY_PREFIX}input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        f"{COMFY_PREFIX}out.2.weight": torch.zeros(4, 8, 3, 3),
    }
    save_file(unet, str(path))
    for family in ("flux1", "chroma", "flux2"):
        with pytest.raises(ModelLoadError, match="none of the FLUX-layout") as caught:
            load_flux_layout(family, read_component(path, torch.float32), torch.float32, path)
        assert str(path) in caught.value.message


def test_another_flux_layout_family_is_refused_naming_it(tmp_path: Path) -> None:
    path = _written(tmp_path, "chroma", "safetensors")
    with pytest.raises(ModelLoadError, match="a chroma model, not flux1") as caught:
        load_flux_layout("flux1", read_component(path, torch.float32), torch.float32, path)
    assert str(path) in caught.value.message


# The published models' configs (the fields diffusers' class defaults do not already give).
_PUBLISHED: dict[str, tuple[str, str, dict[str, Any]]] = {
    "FLUX.1-dev": ("flux1", "FluxTransformer2DModel", {"guidance_embeds": True}),
    "FLUX.1-schnell": ("flux1", "FluxTransformer2DModel", {"guidance_embeds": False}),
    "Chroma1-HD": ("chroma", "ChromaTransformer2DModel", {}),
    "FLUX.2-klein-4B": (
        "flux2",
        "Flux2Transformer2DModel",
        {
            "num_layers": 5,
            "num_single_layers": 20,
            "num_attention_heads": 24,
            "joint_attention_dim": 7680,
            "guidance_embeds": False,
        },
    ),
    "FLUX.2-klein-9B": (
        "flux2",
        "Flux2Transformer2DModel",
        {
            "num_layers": 8,
            "num_single_layers": 24,
            "num_attention_heads": 32,
            "joint_attention_dim": 12288,
            "guidance_embeds": False,
        },
    ),
    "FLUX.2-dev": ("flux2", "Flux2Transformer2DModel", {}),
}


@pytest.mark.parametrize("model", sorted(_PUBLISHED))
def test_a_published_model_s_config_is_read_from_its_full_size_shapes(model: str) -> None:
    """Full-size tensors on the meta device (no memory): the published width (3072 and
    more) goes through the converters' own cuts, and every config field comes back."""
    import warnings

    import diffusers

    family, class_name, config = _PUBLISHED[model]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Chroma's deprecated rope import, inside diffusers
        published = getattr(diffusers, class_name)(**config)
    tensors = original_layout(family, published)
    loaded = load_flux_layout(family, tensors, torch.bfloat16, Path(f"{model}.safetensors"))
    public = {key: value for key, value in published.config.items() if not key.startswith("_")}
    assert {key: loaded.config[key] for key in public} == public
    shapes = {name: tensor.shape for name, tensor in loaded.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in published.state_dict().items()}
