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

The `scheduler` names mean, for a flow model (FLOW_SCHEDULES):
- discrete, simple, sgm_uniform: the model's own schedule, sigma from 1 down in equal steps
  of flow time, shifted as the model's scheduler config says (by the image size where it
  shifts dynamically). It is already uniform in time from the last timestep, which is what
  simple and sgm_uniform mean for SD models, so the three draw the same picture.
- karras, exponential: the same first and last sigma (shifted), the steps between spaced as
  Karras et al. 2022 (rho 7) or evenly in log sigma: diffusers' `use_karras_sigmas` /
  `use_exponential_sigmas` of the flow-matching Euler and LCM schedulers. The DPM-Solver
  and UniPC schedulers compute these from a DDPM beta table, not the flow sigmas (a first
  sigma above 1: NaN pictures, measured), and Heun ignores both flags: those are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from diffusiond.jobs.models import EditInputs, LoraWeight
from diffusiond.sampling import schedule_problem


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

# Measured to run on every family. The API's sampler/scheduler rule for every model
# (sampling.schedule_problem) refuses lcm with any schedule but discrete before this table
# is read, so flow_schedule_samplers leaves out what that rule refuses.
_SIGMA_SCHEDULE_SAMPLERS = ("euler", "euler_a", "lcm")
# scheduler -> (the flow samplers that run it, None: all; the scheduler config options)
FLOW_SCHEDULES: Mapping[str, tuple[tuple[str, ...] | None, Mapping[str, Any]]] = {
    "discrete": (None, {}),
    "karras": (_SIGMA_SCHEDULE_SAMPLERS, {"use_karras_sigmas": True}),
    "exponential": (_SIGMA_SCHEDULE_SAMPLERS, {"use_exponential_sigmas": True}),
    "sgm_uniform": (None, {}),
    "simple": (None, {}),
}


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
    # The pipeline has a peft LoRA loader (`load_lora_weights`) in diffusers: every family
    # here does in 0.42.1 (measured: each loads a diffusers-format LoRA of its own).
    loras: bool = True


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


def flow_schedule_overrides(scheduler: str) -> dict[str, Any]:
    """The scheduler config options that give a flow sampler the `scheduler` schedule."""
    return dict(FLOW_SCHEDULES[scheduler][1])


def flow_schedule_samplers(family: Family, scheduler: str, *, edit: bool) -> tuple[str, ...]:
    """The samplers of `family` that can run `scheduler` (for image edits if `edit`)."""
    able = FLOW_SCHEDULES[scheduler][0]
    return tuple(
        name
        for name in samplers_for_family(family.name, edit=edit)
        if (able is None or name in able) and schedule_problem(name, scheduler) is None
    )


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


@dataclass(frozen=True)
class Refusal:
    """Why a family cannot draw a request: the API field at fault, and what it says."""

    field: str
    rule: str
    message: str


class DrawRequest(Protocol):
    """What family_refusal reads of a request (an ImageSpec or a GenerationRequest)."""

    @property
    def sampler(self) -> str: ...
    @property
    def negative_prompt(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def edit(self) -> EditInputs | None: ...
    @property
    def scheduler(self) -> str: ...
    @property
    def loras(self) -> tuple[LoraWeight, ...]: ...
    @property
    def clip_skip(self) -> int | None: ...


def family_refusal(family: Family, request: DrawRequest) -> Refusal | None:
    """What in `request` this family cannot draw, the first such field; None if nothing."""
    edit = request.edit is not None
    allowed = samplers_for_family(family.name, edit=edit)
    if request.sampler not in allowed:
        what = "image-to-image and inpainting" if edit else "text-to-image"
        rule = f"one of {', '.join(allowed)}"
        return Refusal(
            "sampler",
            rule,
            f"sampler {request.sampler!r} cannot run {family.title} {what}; "
            f"it can run: {', '.join(allowed)}",
        )
    if request.negative_prompt and not family.negative_prompt:
        message = f"negativePrompt: {family.title} takes no negative prompt"
        return Refusal("negativePrompt", "empty for this model", message)
    multiple = family.size_multiple
    if request.width % multiple or request.height % multiple:
        return Refusal(
            "width",
            f"a multiple of {multiple} for this model",
            f"width and height: {family.title} draws sizes in multiples of {multiple}, "
            f"not {request.width}x{request.height}",
        )
    if request.edit is not None:
        inpaint = request.edit.mask is not None
        if edit_pipeline_name(family, inpaint=inpaint) is None:
            mode = "inpainting" if inpaint else "image-to-image"
            field_name = "maskImage" if inpaint else "initImage"
            message = f"{mode} is not available for {family.title} in diffusers"
            return Refusal(field_name, "not for this model", message)
    return _not_yet_supported(family, request)


def schedule_refusal(family: Family, sampler: str, scheduler: str, *, edit: bool) -> Refusal | None:
    """Why `sampler` cannot run the `scheduler` schedule on `family`; None if it can."""
    able = flow_schedule_samplers(family, scheduler, edit=edit)
    if sampler in able:
        return None
    takes = [
        name
        for name in FLOW_SCHEDULES
        if sampler in flow_schedule_samplers(family, name, edit=edit)
    ]
    message = (
        f"scheduler {scheduler!r} cannot run with sampler {sampler!r} on {family.title}; "
        f"{sampler} takes: {', '.join(takes)}; the samplers that take {scheduler}: "
        f"{', '.join(able)}"
    )
    return Refusal("scheduler", f"one of {', '.join(takes)} with sampler {sampler}", message)


def _not_yet_supported(family: Family, request: DrawRequest) -> Refusal | None:
    """What the SD backend does that the flow backend does not do for a family."""
    refusal = schedule_refusal(
        family, request.sampler, request.scheduler, edit=request.edit is not None
    )
    if refusal is not None:
        return refusal
    if request.loras and not family.loras:
        message = f"loras: diffusers has no LoRA loader for {family.title}"
        return Refusal("loras", "none for this model", message)
    if request.clip_skip not in (None, 1):
        return Refusal(
            "clipSkip", "1 for this model", f"clipSkip: {family.title} takes no clip skip"
        )
    return None
