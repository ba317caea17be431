"""The family tables and the flow backend's pure pieces: samplers, guidance, refusals,
latent unpacking for previews, and which backend a folder gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.dispatch import backend_for_model_path
from diffusiond.backends.families import (
    FAMILIES,
    FLOW_SAMPLERS,
    family_for_pipeline,
    guidance_kwargs,
    samplers_for_family,
)
from diffusiond.backends.flow_backend import (
    FlowBackend,
    UnsupportedRequest,
    check_request,
    make_flow_scheduler,
    unpack_latents,
)
from diffusiond.errors import ModelLoadError
from diffusiond.jobs.models import SAMPLERS, EditInputs, InputImage
from diffusiond.settings import load_settings

SPEC = ImageSpec(
    prompt="p", negative_prompt="", width=64, height=64, steps=4, cfg_scale=3.0, seed=1,
    sampler="euler",
)  # fmt: skip


def test_every_family_lists_only_api_samplers_it_has_a_scheduler_for() -> None:
    for name, family in FAMILIES.items():
        for sampler in (*samplers_for_family(name), *samplers_for_family(name, edit=True)):
            assert sampler in SAMPLERS
            assert sampler in FLOW_SAMPLERS, (name, sampler)
        assert family_for_pipeline(family.pipeline) is family
    assert family_for_pipeline("StableDiffusionPipeline") is None


def test_cfg_scale_means_each_familys_guidance() -> None:
    assert guidance_kwargs(FAMILIES["flux1"], 3.5, "") == {"guidance_scale": 3.5}
    assert guidance_kwargs(FAMILIES["sd3"], 7.0, "blurry") == {
        "guidance_scale": 7.0,
        "negative_prompt": "blurry",
    }
    qwen = FAMILIES["qwenimage"]
    assert guidance_kwargs(qwen, 4.0, "") == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    assert guidance_kwargs(qwen, 1.0, "")["negative_prompt"] is None


@pytest.mark.parametrize(
    ("family", "change", "words"),
    [
        ("flux1", {"sampler": "ddim"}, ["'ddim'", "euler, euler_a, lcm, dpm++2m, unipc"]),
        ("zimage", {"sampler": "unipc"}, ["'unipc'", "euler, euler_a, lcm"]),
        ("flux1", {"negative_prompt": "x"}, ["negativePrompt"]),
        ("sd3", {"width": 72}, ["multiples of 16", "72x64"]),
        ("sd3", {"sampler": "heun", "scheduler": "karras"}, ["'karras'", "'heun'", "euler"]),
        ("flux1", {"sampler": "unipc", "scheduler": "exponential"}, ["discrete, sgm_uniform"]),
        ("chroma", {"clip_skip": 2}, ["clipSkip"]),
    ],
)
def test_what_a_family_cannot_draw_is_refused_naming_it(
    family: str, change: dict[str, object], words: list[str]
) -> None:
    spec = ImageSpec(**{**SPEC.__dict__, **change})
    with pytest.raises(UnsupportedRequest) as raised:
        check_request(FAMILIES[family], spec)
    for word in words:
        assert word in str(raised.value)


def test_an_edit_allows_only_the_samplers_with_noise_scaling_and_an_existing_pipeline() -> None:
    image = InputImage(b"png", 64, 64)
    img2img = ImageSpec(**{**SPEC.__dict__, "edit": EditInputs(image), "sampler": "unipc"})
    with pytest.raises(UnsupportedRequest, match="image-to-image"):
        check_request(FAMILIES["flux1"], img2img)
    inpaint = ImageSpec(**{**SPEC.__dict__, "edit": EditInputs(image, mask=image)})
    with pytest.raises(UnsupportedRequest, match="inpainting is not available for Chroma"):
        check_request(FAMILIES["chroma"], inpaint)
    check_request(FAMILIES["flux2"], ImageSpec(**{**SPEC.__dict__, "edit": EditInputs(image)}))


def test_packed_latents_fold_back_to_a_channel_grid() -> None:
    grid = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    # FLUX's packing: 2x2 patches of each channel, one token a patch, rows first.
    packed = grid.view(2, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 64)
    unpacked = unpack_latents(packed, width=48, height=32)
    assert unpacked.shape == (2, 16, 2, 3)
    assert torch.equal(unpacked[0, 0, 0, 0], grid[0, 0, :2, :2].mean())
    assert torch.equal(unpacked[1, 5, 1, 2], grid[1, 5, 2:4, 4:6].mean())
    assert unpack_latents(grid, 48, 32) is grid
    assert unpack_latents(grid[:, :, None], 48, 32).shape == grid.shape


def test_the_stochastic_samplers_draw_from_the_given_generator() -> None:
    config = {"shift": 3.0, "use_dynamic_shifting": False, "num_train_timesteps": 1000}
    sample = torch.zeros(1, 4, 2, 2)
    drawn = []
    for seed in (5, 5, 6):
        scheduler = make_flow_scheduler("euler_a", config, torch.Generator().manual_seed(seed))
        scheduler.set_timesteps(2)
        torch.manual_seed(seed * 7)  # the global generator must not matter
        step = scheduler.step(torch.ones_like(sample), scheduler.timesteps[0], sample)
        drawn.append(step.prev_sample)
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0], drawn[2])


def _folder(tmp_path: Path, class_name: str) -> Path:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return tmp_path


def test_a_folder_goes_to_the_backend_of_its_pipeline(tmp_path: Path) -> None:
    settings = load_settings({}, {"home": str(tmp_path)})
    backend = backend_for_model_path(_folder(tmp_path, "ZImagePipeline"), settings)
    assert isinstance(backend, FlowBackend)
    with pytest.raises(ModelLoadError, match="'WanPipeline' is not supported"):
        backend_for_model_path(_folder(tmp_path, "WanPipeline"), settings)


class _Directory:
    """A models dir of one SD and one FLUX.1 model, as check_for_model sees it."""

    default_id = "sd"

    def __init__(self) -> None:
        from diffusiond.backends.catalog import ModelEntry

        self._entries = {
            "sd": ModelEntry("sd", "diffusers", "sd1", None),
            "flux": ModelEntry("flux", "diffusers", "flux1", None),
        }

    def entries(self) -> list[object]:
        return list(self._entries.values())

    def check(self, model_id: str | None) -> None:
        from diffusiond.errors import InvalidRequest

        if model_id is not None and model_id not in self._entries:
            raise InvalidRequest(f"no model {model_id}", field="model", rule="an id")

    def find(self, model_id: str | None) -> object:
        return self._entries.get(model_id or self.default_id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "flux", "sampler": "ddim"}, "sampler"),
        ({"model": "flux", "negative_prompt": "blur"}, "negativePrompt"),
        ({"model": "flux", "width": 72}, "width"),
        ({"model": "flux", "sampler": "unipc", "scheduler": "karras"}, "scheduler"),
        ({"model": "nope"}, "model"),
    ],
)
def test_the_api_refuses_what_the_named_model_cannot_draw(
    fields: dict[str, object], field: str
) -> None:
    from diffusiond.api.ports import check_for_model
    from diffusiond.errors import InvalidRequest
    from diffusiond.jobs.models import GenerationRequest

    request = GenerationRequest(prompt="p", **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as caught:
        check_for_model(_Directory(), request)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_the_api_passes_what_the_model_can_draw() -> None:
    from diffusiond.api.ports import check_for_model
    from diffusiond.jobs.models import GenerationRequest

    for request in (
        GenerationRequest(prompt="p", sampler="ddim", negative_prompt="blur"),  # the SD default
        GenerationRequest(prompt="p", model="flux", sampler="euler", width=64, height=64),
        GenerationRequest(prompt="p", model="flux", sampler="euler", scheduler="karras"),
    ):
        check_for_model(_Directory(), request)  # type: ignore[arg-type]
