"""The flow-matching model families: one small table each, pure data (no torch import).

What a family's table says: which diffusers pipelines draw it (text-to-image, and where
diffusers has them image-to-image and inpainting), what the API's `cfgScale` drives, whether
a negative prompt means anything, and which of the API's samplers it can run. The flow
backend (flow_backend.py) reads it; the API can read it too (`samplers_for_family`), since
nothing here imports torch or diffusers.

Which samplers run was measured with each family's pipeline in diffusers 0.42.1: a scheduler
the text-to-image pipeline refuses (it passes custom sigmas the scheduler cannot take) is
left out, and image-to-image/inpainting need a scheduler with `scale_noise`, which only the
flow-matching ones have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Guidance(str, Enum):
    """What `cfgScale` means for a family."""

    # Guidance distillation: the scale is an input of the model (one pass a step, no
    # negative prompt); FLUX.1 dev. A model without that input (schnell) ignores it.
    DISTILLED = "distilled"
    # Classifier-free guidance: a second pass on the negative prompt when the scale is > 1.
    CFG = "cfg"
    # The same, passed as diffusers' `true_cfg_scale` (Qwen-Image; `guidance_scale` is kept
    # for guidance-distilled checkpoints there).
    TRUE_CFG = "true_cfg"


@dataclass(frozen=True)
class FlowSampler:
    """A diffusers scheduler for an API sampler name, by class name, with its overrides."""

    scheduler_class: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # True: the scheduler's `flow_shift` is set from the model's own `shift`.
    uses_flow_shift: bool = False


_FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

FLOW_SAMPLERS: Mapping[str, FlowSampler] = {
    "euler": FlowSampler("FlowMatchEulerDiscreteScheduler"),
    # Euler with fresh noise each step (the flow-matching counterpart of euler_a).
    "euler_a": FlowSampler("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "heun": FlowSampler("FlowMatchHeunDiscreteScheduler"),
    "lcm": FlowSampler("FlowMatchLCMScheduler"),
    "dpm++2m": FlowSampler(
        "DPMSolverMultistepScheduler",
        {**_FLOW_SIGMAS, "algorithm_type": "dpmsolver++", "solver_order": 2},
        uses_flow_shift=True,
    ),
    "unipc": FlowSampler("UniPCMultistepScheduler", _FLOW_SIGMAS, uses_flow_shift=True),
}

_EDIT_SAMPLERS = ("euler", "euler_a", "lcm")


@dataclass(frozen=True)
class Family:
    name: str  # as /health's `architecture` says it
    title: str
    pipeline: str  # the text-to-image pipeline class (model_index.json's `_class_name`)
    text_encoders: tuple[str, ...]  # by the roles stable-diffusion.cpp gives their files
    guidance: Guidance
    negative_prompt: bool  # False: a non-empty negative prompt is refused
    samplers: tuple[str, ...]  # text-to-image
    edit_samplers: tuple[str, ...] = _EDIT_SAMPLERS
    img2img: str | None = None  # None: image-to-image runs through `inpaint` with a full mask
    inpaint: str | None = None
    # Width and height must be multiples of this: the VAE's 8x times the 2x2 patches.
    size_multiple: int = 16


FAMILIES: Mapping[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="flux1",
            title="FLUX.1 (dev, schnell)",
            pipeline="FluxPipeline",
            text_encoders=("clip_l", "t5xxl"),
            guidance=Guidance.DISTILLED,
            negative_prompt=False,
            samplers=("euler", "euler_a", "lcm", "dpm++2m", "unipc"),
            img2img="FluxImg2ImgPipeline",
            inpaint="FluxInpaintPipeline",
        ),
        Family(
            name="flux2",
            title="FLUX.2 klein",
            pipeline="Flux2KleinPipeline",
            text_encoders=("llm",),
            guidance=Guidance.CFG,  # the unconditional pass is on an empty prompt
            negative_prompt=False,
            samplers=("euler", "euler_a", "lcm", "dpm++2m", "unipc"),
            inpaint="Flux2KleinInpaintPipeline",
        ),
        Family(
            name="sd3",
            title="Stable Diffusion 3 / 3.5",
            pipeline="StableDiffusion3Pipeline",
            text_encoders=("clip_l", "clip_g", "t5xxl"),
            guidance=Guidance.CFG,
            negative_prompt=True,
            samplers=("euler", "euler_a", "heun", "lcm", "dpm++2m", "unipc"),
            edit_samplers=("euler", "euler_a", "heun", "lcm"),
            img2img="StableDiffusion3Img2ImgPipeline",
            inpaint="StableDiffusion3InpaintPipeline",
        ),
        Family(
            name="zimage",
            title="Z-Image",
            pipeline="ZImagePipeline",
            text_encoders=("llm",),
            guidance=Guidance.CFG,
            negative_prompt=True,
            samplers=("euler", "euler_a", "lcm"),
            img2img="ZImageImg2ImgPipeline",
            inpaint="ZImageInpaintPipeline",
        ),
        Family(
            name="qwenimage",
            title="Qwen-Image",
            pipeline="QwenImagePipeline",
            text_encoders=("llm",),
            guidance=Guidance.TRUE_CFG,
            negative_prompt=True,
            samplers=("euler", "euler_a", "lcm", "unipc"),
            img2img="QwenImageImg2ImgPipeline",
            inpaint="QwenImageInpaintPipeline",
        ),
        Family(
            name="chroma",
            title="Chroma",
            pipeline="ChromaPipeline",
            text_encoders=("t5xxl",),
            guidance=Guidance.CFG,
            negative_prompt=True,
            samplers=("euler", "euler_a", "lcm", "unipc"),
            # diffusers 0.42.1's ChromaInpaintPipeline reads a config field Chroma's
            # transformer lacks, so inpainting is refused until it is fixed there.
            img2img="ChromaImg2ImgPipeline",
        ),
    )
}

_BY_PIPELINE = {family.pipeline: family for family in FAMILIES.values()}


def family_for_pipeline(class_name: str) -> Family | None:
    """The family whose text-to-image pipeline is `class_name`; None for any other."""
    return _BY_PIPELINE.get(class_name)


def samplers_for_family(family: str, *, edit: bool = False) -> tuple[str, ...]:
    """The API sampler names `family` can run (for image-to-image/inpainting if `edit`)."""
    entry = FAMILIES[family]
    return entry.edit_samplers if edit else entry.samplers


def edit_pipeline_name(family: Family, *, inpaint: bool) -> str | None:
    """The pipeline class for an edit; None where diffusers has none for this family."""
    if inpaint:
        return family.inpaint
    return family.img2img or family.inpaint


def guidance_kwargs(family: Family, cfg_scale: float, negative_prompt: str) -> dict[str, Any]:
    """The pipeline call's prompt-side arguments for `cfgScale` and the negative prompt."""
    if family.guidance is Guidance.DISTILLED:
        return {"guidance_scale": cfg_scale}
    if family.guidance is Guidance.TRUE_CFG:
        # Qwen-Image runs guidance only when given a negative prompt: a blank one stands
        # in for "none", as its authors suggest.
        negative = negative_prompt or (" " if cfg_scale > 1 else None)
        return {"true_cfg_scale": cfg_scale, "negative_prompt": negative}
    if family.negative_prompt:
        return {"guidance_scale": cfg_scale, "negative_prompt": negative_prompt or None}
    return {"guidance_scale": cfg_scale}
