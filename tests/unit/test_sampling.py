"""The (sampler, scheduler) rule, its 400, clip skip's mapping, and the noise schedules that
make_scheduler builds checked against their formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from diffusiond.api.schemas import parse_generation_request
from diffusiond.backends.samplers import make_scheduler
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import SAMPLERS, SCHEDULERS
from diffusiond.sampling import (
    SIGMA_SCHEDULE_SAMPLERS,
    SPACING_SAMPLERS,
    diffusers_clip_skip,
    pipeline_guidance,
    runs_unconditional,
    samplers_body,
    samplers_for,
    schedule_problem,
)

# SD 1.5's scheduler config: "leading" spacing with an offset, the case that trips ranges.
SD15 = dict(
    EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="leading",
        steps_offset=1,
    ).config
)
STEPS = 7


def model_sigmas() -> np.ndarray:
    """sqrt((1 - abar) / abar) of SD's scaled-linear betas, for t = 0..999."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    return np.asarray(((1 - abar) / abar) ** 0.5)


def sigmas_of(sampler: str, scheduler: str) -> np.ndarray:
    made = make_scheduler(sampler, SD15, scheduler)
    made.set_timesteps(STEPS)
    return np.asarray(made.sigmas.numpy(), dtype=np.float64)


@pytest.mark.parametrize(
    "sampler", ["euler", "er_sde", "euler_cfg_pp", "euler_a_cfg_pp", "euler_a"]
)
def test_karras_sigmas_follow_karras_rho_7(sampler: str) -> None:
    full = model_sigmas()
    low, high = full[0] ** (1 / 7), full[-1] ** (1 / 7)
    ramp = np.linspace(0, 1, STEPS)
    expected = (high + ramp * (low - high)) ** 7
    got = sigmas_of(sampler, "karras")
    assert got[-1] == 0
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "er_sde", "dpm++2m", "euler_a"])
def test_exponential_sigmas_are_log_linear_over_the_model_range(sampler: str) -> None:
    full = model_sigmas()
    expected = np.exp(np.linspace(math.log(full[-1]), math.log(full[0]), STEPS))
    got = sigmas_of(sampler, "exponential")
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["sgm_uniform", "simple"])
@pytest.mark.parametrize("sampler", ["euler", "er_sde", "euler_a", "ddim", "unipc"])
def test_uniform_schedules_step_down_from_the_last_timestep(sampler: str, scheduler: str) -> None:
    made = make_scheduler(sampler, SD15, scheduler)
    made.set_timesteps(STEPS)
    got = np.asarray(made.timesteps.numpy(), dtype=np.float64)
    # sgm_uniform: 999 - 999 i / n; simple: 999 - floor(1000 i / n); both within a timestep.
    index = np.arange(STEPS)
    formula = (
        999 - 999 * index / STEPS if scheduler == "sgm_uniform" else 999 - index * 1000 // STEPS
    )
    assert np.max(np.abs(got - formula)) <= 1.0


def test_discrete_is_the_model_own_schedule() -> None:
    own = EulerDiscreteScheduler.from_config(SD15)
    own.set_timesteps(STEPS)
    ours = make_scheduler("euler", SD15, "discrete")
    ours.set_timesteps(STEPS)
    assert torch.equal(own.sigmas, ours.sigmas)
    # leading spacing with offset 1: 1 + 142 k for 7 steps (999 // 7 = 142)
    assert ours.timesteps.tolist()[-1] == 1.0


def test_every_scheduler_differs_from_discrete_for_euler() -> None:
    discrete = sigmas_of("euler", "discrete")
    for scheduler in SCHEDULERS[1:]:
        assert not np.allclose(sigmas_of("euler", scheduler), discrete), scheduler


def test_pairs_rule() -> None:
    for sampler in SAMPLERS:
        assert schedule_problem(sampler, "discrete") is None
    assert set(samplers_for("karras")) == SIGMA_SCHEDULE_SAMPLERS
    assert set(samplers_for("sgm_uniform")) == SPACING_SAMPLERS
    problem = schedule_problem("lcm", "karras")
    assert problem is not None
    assert "lcm" in problem
    assert "euler, heun" in problem
    assert schedule_problem("ddim", "sgm_uniform") is None
    assert schedule_problem("dpm++2s_a", "simple") is not None


def parse(body: dict[str, object]) -> object:
    return parse_generation_request(json.dumps(body).encode(), max_batch=5)


def test_a_pair_the_sampler_cannot_run_is_a_400_naming_scheduler() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse({"prompt": "p", "sampler": "ddim", "scheduler": "exponential"})
    assert caught.value.field == "scheduler"
    assert "ddim" in str(caught.value)
    assert "euler_a" in str(caught.value)
    rule = caught.value.details["rule"]
    assert rule == "with sampler ddim: one of discrete, sgm_uniform, simple"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_default_sampler_takes_every_scheduler(scheduler: str) -> None:
    parse({"prompt": "p", "scheduler": scheduler})


@pytest.mark.parametrize(
    ("clip_skip", "layers", "sdxl", "expected"),
    [
        (None, 12, False, None),
        (1, 12, False, None),
        (2, 12, False, 1),
        (12, 12, False, 11),
        (12, 2, False, 1),  # clamped: the first layer still runs
        (2, 1, False, None),
        (2, 32, True, 1),
        (12, 12, True, 10),
    ],
)
def test_clip_skip_maps_to_diffusers_layers_skipped(
    clip_skip: int | None, layers: int, sdxl: bool, expected: int | None
) -> None:
    assert diffusers_clip_skip(clip_skip, layers, sdxl=sdxl) == expected


def test_samplers_body_lists_both() -> None:
    assert samplers_body() == {"samplers": list(SAMPLERS), "schedulers": list(SCHEDULERS)}
    assert {"er_sde", "euler_cfg_pp", "euler_a_cfg_pp"} <= set(SAMPLERS)


def test_cfg_pp_guides_at_every_scale_but_1_like_stable_diffusion_cpp() -> None:
    assert runs_unconditional("euler_cfg_pp", 0.6)
    assert runs_unconditional("euler_a_cfg_pp", 0.0)
    assert not runs_unconditional("euler_cfg_pp", 1.0)
    assert not runs_unconditional("euler", 0.6)
    assert runs_unconditional("euler", 7.5)
    assert pipeline_guidance("euler_cfg_pp", 0.6) > 1  # only to run both passes
    assert pipeline_guidance("euler_cfg_pp", 1.0) == 1
    assert pipeline_guidance("euler_cfg_pp", 5.0) == 5
    assert pipeline_guidance("euler", 0.6) == 0.6


def test_the_a1111_names_refuse_a_pair_the_sampler_cannot_run() -> None:
    from diffusiond.api.a1111.names import map_sampler

    names = {"samplers": SAMPLERS, "schedulers": SCHEDULERS}
    assert map_sampler("DPM++ 2M Karras", None, **names) == ("dpm++2m", "karras")
    assert map_sampler("DDIM", "Automatic", **names) == ("ddim", "discrete")
    with pytest.raises(InvalidRequest) as caught:
        map_sampler("DDIM", "Karras", **names)
    assert caught.value.field == "scheduler"
    assert "cannot be used with sampler ddim" in str(caught.value)
