"""The API's sampler names (stable-diffusion.cpp's vocabulary) mapped to diffusers schedulers.

One table; a scheduler is built from the model's own scheduler config for every request,
never mutated on a shared pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from diffusiond.backends.k_samplers import (
    ERSDEScheduler,
    EulerAncestralCFGPPScheduler,
    EulerAncestralScheduler,
    EulerCFGPPScheduler,
)
from diffusiond.jobs.models import SAMPLERS
from diffusiond.sampling import schedule_overrides


@dataclass(frozen=True)
class SchedulerChoice:
    scheduler_class: type[Any]
    overrides: Mapping[str, Any] = field(default_factory=dict)


SAMPLER_CLASSES: Mapping[str, SchedulerChoice] = {
    "euler_a": SchedulerChoice(EulerAncestralDiscreteScheduler),
    "euler": SchedulerChoice(EulerDiscreteScheduler),
    "heun": SchedulerChoice(HeunDiscreteScheduler),
    "dpm2": SchedulerChoice(KDPM2DiscreteScheduler),
    "dpm++2s_a": SchedulerChoice(DPMSolverSinglestepScheduler, {"solver_order": 2}),
    "dpm++2m": SchedulerChoice(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
    # The second-order variant: the same multistep solver with Heun's update in place of
    # the midpoint one.
    "dpm++2mv2": SchedulerChoice(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "heun"},
    ),
    "lcm": SchedulerChoice(LCMScheduler),
    "ddim": SchedulerChoice(DDIMScheduler),
    "unipc": SchedulerChoice(UniPCMultistepScheduler),
    # The seed system's three (k_samplers.py): sigma-space samplers on Euler's schedule.
    "er_sde": SchedulerChoice(ERSDEScheduler),
    "euler_cfg_pp": SchedulerChoice(EulerCFGPPScheduler),
    "euler_a_cfg_pp": SchedulerChoice(EulerAncestralCFGPPScheduler),
}

# diffusers' EulerAncestralDiscreteScheduler has no Karras or exponential sigmas: for those
# schedules euler_a runs as the same step on Euler's schedule (k_samplers.py).
SIGMA_SCHEDULE_CLASSES: Mapping[str, SchedulerChoice] = {
    "euler_a": SchedulerChoice(EulerAncestralScheduler),
}
SIGMA_SCHEDULES = frozenset({"karras", "exponential"})

assert tuple(SAMPLER_CLASSES) == SAMPLERS, "the scheduler table must cover every API sampler"


def make_scheduler(
    sampler: str, base_config: Mapping[str, Any], scheduler: str = "discrete"
) -> Any:
    """A fresh scheduler for `sampler` on the `scheduler` noise schedule, built from the
    model's scheduler config (sampling.py says which pairs can run)."""
    choice = SAMPLER_CLASSES[sampler]
    if scheduler in SIGMA_SCHEDULES:
        choice = SIGMA_SCHEDULE_CLASSES.get(sampler, choice)
    # The schedule's options the class takes (others it would only warn about).
    known = inspect.signature(choice.scheduler_class.__init__).parameters
    schedule = {k: v for k, v in schedule_overrides(sampler, scheduler).items() if k in known}
    options = {**choice.overrides, **schedule}
    return choice.scheduler_class.from_config(dict(base_config), **options)
