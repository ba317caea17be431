"""Which noise schedule each sampler can run, and how clip skip reaches diffusers.

Pure rules (no torch): the API validates a (sampler, scheduler) pair with `schedule_problem`
before a job exists, and the backend builds the scheduler from `schedule_overrides`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusiond.jobs.models import SAMPLERS, SCHEDULERS

# Samplers whose diffusers scheduler takes `use_karras_sigmas` / `use_exponential_sigmas`
# (the k-samplers of k_samplers.py inherit both from EulerDiscreteScheduler; euler_a runs as
# one of them on these schedules, see backends/samplers.py).
SIGMA_SCHEDULE_SAMPLERS = frozenset(
    {
        "euler_a",
        "euler",
        "heun",
        "dpm2",
        "dpm++2s_a",
        "dpm++2m",
        "dpm++2mv2",
        "unipc",
        "er_sde",
        "euler_cfg_pp",
        "euler_a_cfg_pp",
    }
)
# Samplers whose diffusers scheduler takes `timestep_spacing="trailing"`. Not dpm++2s_a: its
# own spacing is already uniform from the last timestep; not lcm: it keeps its training
# schedule's timesteps.
SPACING_SAMPLERS = frozenset(
    {
        "euler_a",
        "euler",
        "heun",
        "dpm2",
        "dpm++2m",
        "dpm++2mv2",
        "ddim",
        "unipc",
        "er_sde",
        "euler_cfg_pp",
        "euler_a_cfg_pp",
    }
)

# scheduler -> (the samplers that can run it, the diffusers config options that do it)
_SIGMAS_OFF = {"use_karras_sigmas": False, "use_exponential_sigmas": False}
# Karras and exponential sigmas span the model's whole sigma range (Karras et al. 2022, as
# stable-diffusion.cpp): Euler-like diffusers classes take the range from the spaced
# timesteps, which "leading" spacing (SD 1.5's config) cuts short, so linspace is set.
_FULL_RANGE = {"timestep_spacing": "linspace"}
SCHEDULE_TABLE: Mapping[str, tuple[frozenset[str], Mapping[str, Any]]] = {
    "discrete": (frozenset(SAMPLERS), {}),
    "karras": (
        SIGMA_SCHEDULE_SAMPLERS,
        {"use_karras_sigmas": True, "use_exponential_sigmas": False, **_FULL_RANGE},
    ),
    "exponential": (
        SIGMA_SCHEDULE_SAMPLERS,
        {"use_exponential_sigmas": True, "use_karras_sigmas": False, **_FULL_RANGE},
    ),
    # Both are uniform in timesteps from the last one (999) down, without reaching 0:
    # sgm_uniform takes t_i = 999 - 999 i/n, simple t_i = 999 - floor(1000 i/n), diffusers'
    # trailing spacing t_i = 999 - round(1000 i/n); they differ by under one timestep.
    "sgm_uniform": (SPACING_SAMPLERS, {"timestep_spacing": "trailing", **_SIGMAS_OFF}),
    "simple": (SPACING_SAMPLERS, {"timestep_spacing": "trailing", **_SIGMAS_OFF}),
}

assert tuple(SCHEDULE_TABLE) == SCHEDULERS, "the schedule table must cover every scheduler"


def samplers_for(scheduler: str) -> tuple[str, ...]:
    """The samplers that can run `scheduler`, in the API's order."""
    able = SCHEDULE_TABLE[scheduler][0]
    return tuple(name for name in SAMPLERS if name in able)


def schedule_problem(sampler: str, scheduler: str) -> str | None:
    """Why `sampler` cannot run `scheduler` (a sentence naming the samplers that can), or
    None when it can. Both names are known ones."""
    if sampler in SCHEDULE_TABLE[scheduler][0]:
        return None
    return (
        f"scheduler {scheduler} cannot be used with sampler {sampler}; "
        f"the samplers that take it: {', '.join(samplers_for(scheduler))}"
    )


def schedule_overrides(sampler: str, scheduler: str) -> dict[str, Any]:
    """The scheduler config options that give `sampler` the `scheduler` schedule."""
    problem = schedule_problem(sampler, scheduler)
    if problem is not None:
        raise ValueError(problem)
    return dict(SCHEDULE_TABLE[scheduler][1])


CFG_PP_SAMPLERS = frozenset({"euler_cfg_pp", "euler_a_cfg_pp"})
# Any scale above 1 makes diffusers run the unconditional pass; a CFG++ scheduler then mixes
# the two predictions with the request's own scale (k_samplers.CFGPPScheduler).
GUIDANCE_SWITCH = 2.0


def runs_unconditional(sampler: str, cfg_scale: float) -> bool:
    """Whether a request needs the unconditional prediction: diffusers guides above 1; the
    CFG++ samplers, as stable-diffusion.cpp, at every scale but 1 (the paper's lambda is in
    0..1)."""
    return cfg_scale != 1 if sampler in CFG_PP_SAMPLERS else cfg_scale > 1


def pipeline_guidance(sampler: str, cfg_scale: float) -> float:
    """The guidance_scale to call a diffusers pipeline with for this request."""
    if sampler in CFG_PP_SAMPLERS and cfg_scale < 1:
        return GUIDANCE_SWITCH
    return cfg_scale


def samplers_body() -> dict[str, list[str]]:
    """GET /v1/samplers: the sampler and scheduler names a request may give."""
    return {"samplers": list(SAMPLERS), "schedulers": list(SCHEDULERS)}


def diffusers_clip_skip(clip_skip: int | None, encoder_layers: int, *, sdxl: bool) -> int | None:
    """diffusers' `clip_skip` (layers skipped) for AUTOMATIC1111's "Clip skip" (1 = the
    last layer), clamped so that at least one transformer layer still runs.

    diffusers reads SD's hidden state -(skip + 1) and SDXL's -(skip + 2) (SDXL already
    takes the penultimate layer): the deepest skip is encoder_layers - 1 (SD) or - 2 (SDXL).
    """
    if clip_skip is None or clip_skip <= 1:
        return None
    deepest = encoder_layers - (2 if sdxl else 1)
    skip = min(clip_skip - 1, deepest)
    return skip if skip > 0 else None
