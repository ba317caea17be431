"""The flow families' schedule and LoRA rules: which (sampler, scheduler) pairs a family
runs and what a refusal names, which family a LoRA header is for, which LoRAs fit which
model, and that a schedule changes the sigmas a flow scheduler steps through."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.families import (
    FAMILIES,
    FLOW_SCHEDULES,
    family_refusal,
    flow_schedule_samplers,
    samplers_for_family,
)
from diffusiond.backends.flow_backend import make_flow_scheduler
from diffusiond.backends.flow_lora_files import flow_lora_architecture, lora_fits
from diffusiond.backends.lora_files import lora_architecture, lora_format
from diffusiond.jobs.models import SCHEDULERS, EditInputs, InputImage, LoraWeight
from diffusiond.sampling import schedule_problem

SPEC = ImageSpec(
    prompt="p", negative_prompt="", width=64, height=64, steps=4, cfg_scale=3.0, seed=1,
    sampler="euler",
)  # fmt: skip
Shapes = dict[str, tuple[int, ...]]


def spec(**change: object) -> ImageSpec:
    return dataclasses.replace(SPEC, **change)  # type: ignore[arg-type]


def test_the_schedule_table_covers_every_api_scheduler() -> None:
    assert tuple(FLOW_SCHEDULES) == SCHEDULERS


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_euler_runs_every_schedule_and_the_api_rule_agrees(family: str) -> None:
    for scheduler in SCHEDULERS:
        for sampler in flow_schedule_samplers(FAMILIES[family], scheduler, edit=False):
            # Every pair a family accepts gets past the API's own sampler/scheduler rule.
            assert schedule_problem(sampler, scheduler) is None, (sampler, scheduler)
        for sampler in ("euler", "euler_a"):
            assert (
                family_refusal(FAMILIES[family], spec(sampler=sampler, scheduler=scheduler)) is None
            )


@pytest.mark.parametrize(
    ("family", "sampler", "scheduler"),
    [
        ("sd3", "heun", "karras"),
        ("flux1", "dpm++2m", "exponential"),
        ("qwenimage", "unipc", "karras"),
    ],
)
def test_a_schedule_a_sampler_cannot_run_is_refused_naming_scheduler(
    family: str, sampler: str, scheduler: str
) -> None:
    refusal = family_refusal(FAMILIES[family], spec(sampler=sampler, scheduler=scheduler))
    assert refusal is not None
    assert refusal.field == "scheduler"
    assert f"{scheduler!r}" in refusal.message
    assert f"{sampler!r}" in refusal.message
    assert "discrete, sgm_uniform, simple" in refusal.message  # what this sampler takes
    assert "euler, euler_a" in refusal.message  # the samplers that take this schedule
    assert family_refusal(FAMILIES[family], spec(sampler=sampler, scheduler="simple")) is None


def test_an_edit_with_karras_runs_on_the_edit_samplers() -> None:
    image = InputImage(b"png", 64, 64)
    edit = spec(scheduler="karras", edit=EditInputs(image, mask=image))
    assert family_refusal(FAMILIES["flux1"], edit) is None
    assert family_refusal(FAMILIES["sd3"], dataclasses.replace(edit, sampler="heun")) is not None


def test_loras_are_accepted_where_diffusers_has_a_loader_and_refused_elsewhere() -> None:
    with_lora = spec(loras=(LoraWeight("style", 1.0),))
    for family in FAMILIES.values():
        assert family.loras
        assert family_refusal(family, with_lora) is None
    without_loader = dataclasses.replace(FAMILIES["flux2"], loras=False)
    refusal = family_refusal(without_loader, with_lora)
    assert refusal is not None
    assert refusal.field == "loras"
    assert "FLUX.2 klein" in refusal.message


def test_karras_and_exponential_change_the_sigmas_and_keep_their_ends() -> None:
    config = {"shift": 3.0, "use_dynamic_shifting": False}

    def sigmas(sampler: str, scheduler: str) -> list[float]:
        made = make_flow_scheduler(sampler, config, torch.Generator(), scheduler)
        made.set_timesteps(6)
        return [round(float(sigma), 6) for sigma in made.sigmas]

    for sampler in ("euler", "euler_a"):
        own = sigmas(sampler, "discrete")
        assert sigmas(sampler, "simple") == sigmas(sampler, "sgm_uniform") == own
        karras, exponential = sigmas(sampler, "karras"), sigmas(sampler, "exponential")
        assert len({tuple(own), tuple(karras), tuple(exponential)}) == 3
        for changed in (karras, exponential):
            assert (changed[0], changed[-2], changed[-1]) == (own[0], own[-2], own[-1])
            assert changed == sorted(changed, reverse=True)


def pair(module: str, inputs: int, outputs: int, *, kohya: bool = False) -> Shapes:
    if kohya:
        return {f"{module}.lora_down.weight": (4, inputs), f"{module}.lora_up.weight": (outputs, 4)}
    return {
        f"transformer.{module}.lora_A.weight": (4, inputs),
        f"transformer.{module}.lora_B.weight": (outputs, 4),
    }


@pytest.mark.parametrize(
    ("shapes", "architecture"),
    [
        (pair("single_transformer_blocks.3.attn.to_q", 3072, 3072), "flux1"),
        (pair("lora_unet_double_blocks_0_img_attn_qkv", 3072, 9216, kohya=True), "flux1"),
        (pair("lora_unet_single_blocks_0_linear1", 3072, 21504, kohya=True), "flux1"),
        (pair("lora_unet_single_blocks_0_linear1", 3072, 27648, kohya=True), "flux2"),
        (pair("lora_unet_double_blocks_0_img_mlp_0", 3072, 12288, kohya=True), "flux1"),
        (pair("lora_unet_double_blocks_0_img_mlp_0", 3072, 18432, kohya=True), "flux2"),
        (pair("lora_unet_double_stream_modulation_img_lin", 3072, 18432, kohya=True), "flux2"),
        (pair("single_transformer_blocks.0.attn.to_qkv_mlp_proj", 3072, 27648), "flux2"),
        (pair("transformer_blocks.0.ff.linear_in", 3072, 18432), "flux2"),
        (pair("transformer_blocks.23.attn.to_q", 1536, 1536), "sd3"),
        (pair("layers.4.attention.to_q", 3840, 3840), "zimage"),
        (pair("lora_unet_layers_4_attention_to_q", 3840, 3840, kohya=True), "zimage"),
        (pair("transformer_blocks.0.img_mlp.net.0.proj", 3072, 12288), "qwenimage"),
        (
            pair("lora_unet_transformer_blocks_0_img_mlp_net_0_proj", 3072, 12288, kohya=True),
            "qwenimage",
        ),
        (pair("transformer_blocks.59.attn.to_q", 3072, 3072), "qwenimage"),
        (pair("transformer_blocks.3.attn.to_q", 3072, 3072), "unknown"),
        (pair("distilled_guidance_layer.layers.0.linear_1", 5120, 5120), "chroma"),
    ],
)
def test_a_flow_loras_family_is_read_from_its_header(shapes: Shapes, architecture: str) -> None:
    assert lora_format(shapes) in ("peft", "kohya")
    assert lora_architecture(shapes) == architecture


def test_sd_loras_are_not_read_as_flow_ones() -> None:
    kohya_sd = pair(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320, kohya=True
    )
    peft_sd = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 768)
    }
    assert flow_lora_architecture(kohya_sd) is None
    assert flow_lora_architecture(peft_sd) is None
    assert lora_architecture(kohya_sd) == lora_architecture(peft_sd) == "sd1"


def test_which_loras_fit_which_models() -> None:
    assert lora_fits("flux1", "flux1")
    assert lora_fits("chroma", "chroma")
    assert lora_fits("flux1", "chroma")  # Chroma keeps FLUX.1's attention and MLP layers
    assert not lora_fits("chroma", "flux1")
    assert not lora_fits("flux1", "sd3")
    assert not lora_fits("sd1", "flux1")
    assert lora_fits("unknown", "qwenimage")
    assert lora_fits("sd3", "unknown")
    assert samplers_for_family("chroma")  # the family exists under the name checked
