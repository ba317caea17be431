"""The seed system's samplers (backends/k_samplers.py): each step's math on toy denoisers
whose answer is known, and the CFG++ hook."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from diffusiond.backends.k_samplers import (
    CFGPPScheduler,
    ERSDEScheduler,
    EulerAncestralCFGPPScheduler,
    EulerAncestralScheduler,
    EulerCFGPPScheduler,
    ancestral_step,
    er_sde_integrals,
    er_sde_noise_scale,
    unconditional_capture,
)
from diffusiond.backends.samplers import make_scheduler

CONFIG = dict(
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
)
SHAPE = (1, 4, 8, 8)
NEW_SAMPLERS = ("er_sde", "euler_cfg_pp", "euler_a_cfg_pp")

# A denoiser: (x, sigma) -> the epsilon its model would predict.
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def target() -> torch.Tensor:
    return torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)


def fixed_x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The epsilon of a model that always sees `target()` as the clean image."""
    return (x - target()) / sigma


def sample(scheduler: Any, denoiser: Denoiser, steps: int = 6, seed: int = 0) -> torch.Tensor:
    """The diffusers loop of a pipeline, with the denoiser in place of the UNet."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x: torch.Tensor = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        scheduler.scale_model_input(x, timestep)
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        x = scheduler.step(denoiser(x, sigma), timestep, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["euler", *NEW_SAMPLERS])
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
def test_a_fixed_x0_is_reached(sampler: str, schedule: str) -> None:
    made = make_scheduler(sampler, CONFIG, schedule)
    torch.testing.assert_close(sample(made, fixed_x0), target(), rtol=0, atol=1e-5)


def test_euler_cfg_pp_without_guidance_is_plain_euler() -> None:
    def drifting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.3 * x / (sigma + 1) + 0.1  # not a fixed x0: the path matters

    plain = sample(EulerDiscreteScheduler.from_config(CONFIG), drifting)
    cfg_pp = sample(EulerCFGPPScheduler.from_config(CONFIG), drifting)
    torch.testing.assert_close(cfg_pp, plain, rtol=1e-5, atol=1e-5)


def test_cfg_pp_with_cond_equal_to_uncond_is_plain_euler() -> None:
    def drifting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.3 * x / (sigma + 1) + 0.1

    made = EulerCFGPPScheduler.from_config(CONFIG)

    def with_uncond(x: torch.Tensor, sigma: float) -> torch.Tensor:
        made.unconditional_output = drifting(x, sigma)
        return drifting(x, sigma)

    plain = sample(EulerDiscreteScheduler.from_config(CONFIG), drifting)
    torch.testing.assert_close(sample(made, with_uncond), plain, rtol=1e-5, atol=1e-5)


def test_cfg_pp_renoises_with_the_unconditional_prediction() -> None:
    made = EulerCFGPPScheduler.from_config(CONFIG)
    made.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 10
    guided, unconditional = torch.full(SHAPE, 0.5), torch.full(SHAPE, -0.2)
    sigma, sigma_next = float(made.sigmas[0]), float(made.sigmas[1])
    made.unconditional_output = unconditional
    out = made.step(guided, made.timesteps[0], x).prev_sample
    # x0 from the guided epsilon, back up to sigma_next along the unconditional epsilon
    expected = (x - sigma * guided) + sigma_next * unconditional
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert made.unconditional_output is None  # used once


def test_ancestral_split_keeps_the_variance() -> None:
    for sigma, sigma_next in [(14.6, 3.2), (1.0, 0.5), (0.3, 0.0)]:
        down, up = ancestral_step(sigma, sigma_next)
        assert down**2 + up**2 == pytest.approx(sigma_next**2)
        assert up == pytest.approx(math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))


def test_our_euler_ancestral_is_diffusers_euler_ancestral() -> None:
    def drifting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.3 * x / (sigma + 1) + 0.1

    theirs = sample(EulerAncestralDiscreteScheduler.from_config(CONFIG), drifting, seed=5)
    ours = sample(EulerAncestralScheduler.from_config(CONFIG), drifting, seed=5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_euler_a_cfg_pp_without_uncond_is_euler_ancestral() -> None:
    def drifting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.3 * x / (sigma + 1) + 0.1

    ours = sample(EulerAncestralScheduler.from_config(CONFIG), drifting, seed=2)
    cfg_pp = sample(EulerAncestralCFGPPScheduler.from_config(CONFIG), drifting, seed=2)
    torch.testing.assert_close(cfg_pp, ours)


def test_er_sde_first_step_is_its_formula() -> None:
    made = ERSDEScheduler.from_config(CONFIG)
    made.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 14
    sigma, sigma_next = float(made.sigmas[0]), float(made.sigmas[1])
    out = made.step(fixed_x0(x, sigma), made.timesteps[0], x, torch.Generator().manual_seed(9))
    ratio = float(er_sde_noise_scale(sigma_next) / er_sde_noise_scale(sigma))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    expected = (
        ratio * x + (1 - ratio) * target() + math.sqrt(sigma_next**2 - (ratio * sigma) ** 2) * noise
    )
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-4)


def test_er_sde_noise_scale_and_integrals() -> None:
    assert er_sde_noise_scale(1.0) == pytest.approx(math.e + 10)
    assert er_sde_noise_scale(0.0) == 0
    lam_s, lam_t = 3.0, 1.0
    grid = np.linspace(lam_t, lam_s, 200_001)
    scales = er_sde_noise_scale(grid)
    first, second = er_sde_integrals(lam_s, lam_t)
    assert first == pytest.approx(np.trapezoid(1 / scales, grid), rel=1e-2)
    assert second == pytest.approx(np.trapezoid((grid - lam_s) / scales, grid), rel=1e-2)


def test_er_sde_second_step_adds_the_slope_of_x0() -> None:
    """Stage 2: r x + (1 - r) x0 + (dl + S f(l_t)) (x0 - x0_before) / (l_s - l_before) +
    noise, with S the integral of 1/f over [l_t, l_s] and lambda = sigma."""
    made = ERSDEScheduler.from_config(CONFIG)
    made.set_timesteps(5)
    sigmas = [float(value) for value in made.sigmas[:3]]
    x0 = [target() + 0.05 * sigma for sigma in sigmas]  # x0 drifts with sigma
    noise_source = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 14
    x = made.step(fixed_eps(x, sigmas[0], x0[0]), made.timesteps[0], x, noise_source).prev_sample
    before = x.clone()
    out = made.step(fixed_eps(x, sigmas[1], x0[1]), made.timesteps[1], x, noise_source)

    replay = torch.Generator().manual_seed(11)
    torch.randn(SHAPE, generator=replay)  # the first step's noise
    noise = torch.randn(SHAPE, generator=replay)
    lam_before, lam_s, lam_t = sigmas
    ratio = float(er_sde_noise_scale(lam_t) / er_sde_noise_scale(lam_s))
    first, _ = er_sde_integrals(lam_s, lam_t)
    slope = (x0[1] - x0[0]) / (lam_s - lam_before)
    expected = (
        ratio * before
        + (1 - ratio) * x0[1]
        + ((lam_t - lam_s) + first * float(er_sde_noise_scale(lam_t))) * slope
        + math.sqrt(lam_t**2 - (ratio * lam_s) ** 2) * noise
    )
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-4)


def fixed_eps(x: torch.Tensor, sigma: float, x0: torch.Tensor) -> torch.Tensor:
    return (x - x0) / sigma


def test_new_samplers_are_deterministic_per_seed_and_differ() -> None:
    def drifting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.3 * x / (sigma + 1) + 0.1

    runs = {name: sample(make_scheduler(name, CONFIG), drifting, seed=4) for name in NEW_SAMPLERS}
    again = {name: sample(make_scheduler(name, CONFIG), drifting, seed=4) for name in NEW_SAMPLERS}
    euler = sample(make_scheduler("euler", CONFIG), drifting, seed=4)
    for name in NEW_SAMPLERS:
        assert torch.equal(runs[name], again[name]), name
    # er_sde and euler_a_cfg_pp add noise; euler_cfg_pp without an uncond is euler itself
    assert not torch.allclose(runs["er_sde"], euler)
    assert not torch.allclose(runs["euler_a_cfg_pp"], euler)


class FakeUNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 2,)


class FakePipeline:
    def __init__(self, scheduler: Any, guided: bool) -> None:
        self.scheduler = scheduler
        self.unet = FakeUNet()
        self.do_classifier_free_guidance = guided


@pytest.mark.parametrize("guided", [True, False])
def test_the_hook_keeps_the_unconditional_half_and_is_removed(guided: bool) -> None:
    pipeline = FakePipeline(EulerCFGPPScheduler.from_config(CONFIG), guided)
    batch = torch.arange(4.0).reshape(2, 2) if guided else torch.ones(1, 2)
    with unconditional_capture(pipeline, 0.7):
        assert pipeline.scheduler.guidance == 0.7
        pipeline.unet(batch)
        kept = pipeline.scheduler.unconditional_output
        assert kept is not None
        torch.testing.assert_close(kept, (batch * 2)[:1])
        conditional = pipeline.scheduler.conditional_output
        if guided:
            assert conditional is not None
            torch.testing.assert_close(conditional, (batch * 2)[1:])
        else:
            assert conditional is None
    assert not pipeline.unet._forward_hooks
    assert pipeline.scheduler.unconditional_output is None
    assert pipeline.scheduler.guidance is None


def test_the_hook_ignores_other_threads_and_other_schedulers() -> None:
    pipeline = FakePipeline(EulerCFGPPScheduler.from_config(CONFIG), True)
    with unconditional_capture(pipeline):
        worker = threading.Thread(target=pipeline.unet, args=(torch.ones(2, 2),))
        worker.start()
        worker.join()
        assert pipeline.scheduler.unconditional_output is None
    plain = FakePipeline(EulerDiscreteScheduler.from_config(CONFIG), True)
    with unconditional_capture(plain):
        assert not plain.unet._forward_hooks
    assert issubclass(EulerAncestralCFGPPScheduler, CFGPPScheduler)


def test_cfg_pp_mixes_the_halves_with_its_own_guidance() -> None:
    """Below 1 the pipeline is called with a scale only to run both passes: the scheduler
    mixes uncond + lambda (cond - uncond) itself and ignores what the pipeline mixed."""
    made = EulerCFGPPScheduler.from_config(CONFIG)
    made.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 10
    unconditional, conditional = torch.full(SHAPE, -0.2), torch.full(SHAPE, 0.6)
    sigma, sigma_next = float(made.sigmas[0]), float(made.sigmas[1])
    made.unconditional_output, made.conditional_output = unconditional, conditional
    made.guidance = 0.5
    pipeline_mix = torch.full(SHAPE, 99.0)  # what a pipeline at scale 2 would have passed
    out = made.step(pipeline_mix, made.timesteps[0], x).prev_sample
    guided = unconditional + 0.5 * (conditional - unconditional)
    expected = (x - sigma * guided) + sigma_next * unconditional
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert made.conditional_output is None


def test_er_sde_third_step_adds_the_curvature_of_x0() -> None:
    """Stage 3 on top of stage 2: (dl^2 / 2 + S_u f(l_t)) (slope - slope_before) /
    ((l_s - l_before2) / 2), with S_u the integral of (l - l_s) / f over [l_t, l_s]."""
    made = ERSDEScheduler.from_config(CONFIG)
    made.set_timesteps(6)
    lam = [float(value) for value in made.sigmas[:4]]
    x0 = [target() + 0.05 * sigma + 0.002 * sigma**2 for sigma in lam]  # curved in sigma
    noise_source = torch.Generator().manual_seed(21)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 14
    for index in range(2):
        eps = fixed_eps(x, lam[index], x0[index])
        x = made.step(eps, made.timesteps[index], x, noise_source).prev_sample
    before = x.clone()
    out = made.step(fixed_eps(x, lam[2], x0[2]), made.timesteps[2], x, noise_source)

    replay = torch.Generator().manual_seed(21)
    for _ in range(2):
        torch.randn(SHAPE, generator=replay)
    noise = torch.randn(SHAPE, generator=replay)
    lam_s, lam_t = lam[2], lam[3]
    ratio = float(er_sde_noise_scale(lam_t) / er_sde_noise_scale(lam_s))
    first, second = er_sde_integrals(lam_s, lam_t)
    scale_t = float(er_sde_noise_scale(lam_t))
    slope_before = (x0[1] - x0[0]) / (lam[1] - lam[0])
    slope = (x0[2] - x0[1]) / (lam[2] - lam[1])
    curvature = (slope - slope_before) / ((lam[2] - lam[0]) / 2)
    gap = lam_t - lam_s
    expected = (
        ratio * before
        + (1 - ratio) * x0[2]
        + (gap + first * scale_t) * slope
        + (gap**2 / 2 + second * scale_t) * curvature
        + math.sqrt(lam_t**2 - (ratio * lam_s) ** 2) * noise
    )
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-4)
