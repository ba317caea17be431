"""The seed system's samplers as diffusers schedulers: ER-SDE, Euler CFG++ and Euler
ancestral CFG++.

Each one is an `EulerDiscreteScheduler` with its own `step`: the schedule (every
`scheduler` option: Karras, exponential, spacing), `scale_model_input`, `add_noise`, the
begin index image-to-image sets and `init_noise_sigma` are Euler's, so the stock
text-to-image, image-to-image and inpainting pipelines drive them as they drive Euler. The
math works in k-diffusion's sigma space: x = x0 + sigma * noise.

- ER-SDE-Solver-3: Cui et al. 2023, "Elucidating the Solution Space of Extended
  Reverse-Time SDE for Diffusion Models" (arXiv:2309.06169), with the noise scale function
  and the 200-point integrals of stable-diffusion.cpp's `sample_er_sde` (eta 1).
- CFG++: Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
  Diffusion Models" (arXiv:2406.08070): the denoised estimate uses the guided prediction,
  the renoising direction the unconditional one, as stable-diffusion.cpp's
  `sample_euler_cfg_pp` / `sample_euler_ancestral_cfg_pp` do. The pipeline combines the two
  predictions before `step`, so `unconditional_capture` keeps the unconditional half of the
  UNet's output for the scheduler while a request runs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

# ER-SDE: the solver's order, and the points of its numerical integrals (as the reference).
ER_SDE_MAX_STAGE = 3
ER_SDE_INTEGRATION_POINTS = 200
SIGMA_FLOOR = 1e-6  # the ER-SDE lambda of sigma 0 (its noise scale function needs > 0)


class SigmaSpaceScheduler(EulerDiscreteScheduler):  # type: ignore[misc]
    """Euler's schedule and bookkeeping; subclasses say how one step moves x."""

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self.reset_history()

    def reset_history(self) -> None:
        """Forget what earlier steps left (a new run starts)."""

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> Any:
        """The model's estimate of x0 from its raw output at `sigma`."""
        kind = self.config.prediction_type
        if kind in ("sample", "original_sample"):
            return model_output.to(torch.float32)
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        raise ValueError(f"prediction_type {kind!r} is not supported by {type(self).__name__}")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Any:
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        sigma = float(self.sigmas[index])
        sigma_next = float(self.sigmas[index + 1])
        x = sample.to(torch.float32)
        estimate = self.denoised(model_output, x, sigma)
        moved = self.advance(x, estimate, sigma, sigma_next, generator)
        self._step_index += 1
        prev_sample = moved.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, estimate)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=estimate)

    def advance(
        self,
        x: torch.Tensor,
        denoised: torch.Tensor,
        sigma: float,
        sigma_next: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
        """The ODE's direction dx/dsigma = (x - x0) / sigma."""
        return (x - denoised) / sigma

    @staticmethod
    def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise: torch.Tensor = randn_tensor(
            x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
        return noise


def er_sde_noise_scale(lam: Any) -> Any:
    """The ER-SDE paper's customised noise scale function f(lambda) = lambda (e^{lambda^0.3}
    + 10), for a float or a numpy array (lambda >= 0)."""
    lam = np.maximum(lam, 0.0)
    return lam * (np.exp(np.power(lam, 0.3)) + 10.0)


def er_sde_integrals(lam_s: float, lam_t: float) -> tuple[float, float]:
    """The two integrals of ER-SDE's higher-order terms over [lam_t, lam_s]:
    int dl / f(l) and int (l - lam_s) dl / f(l), by a left Riemann sum."""
    width = (lam_s - lam_t) / ER_SDE_INTEGRATION_POINTS
    points = lam_t + width * np.arange(ER_SDE_INTEGRATION_POINTS)
    scales = er_sde_noise_scale(points)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales > 0)
    return float(width * inverse.sum()), float(width * ((points - lam_s) * inverse).sum())


class ERSDEScheduler(SigmaSpaceScheduler):
    """ER-SDE-Solver-3 for a variance-exploding (sigma) parameterisation: a stochastic
    solver whose first-order step is x <- r x + (1 - r) x0 with r = f(sigma_t) / f(sigma_s),
    plus first and second divided differences of x0 over lambda = sigma, plus fresh noise of
    variance sigma_t^2 - r^2 sigma_s^2."""

    def reset_history(self) -> None:
        self._previous: list[tuple[float, torch.Tensor]] = []  # (lambda, x0), newest last
        self._previous_slope: torch.Tensor | None = None

    def advance(
        self,
        x: torch.Tensor,
        denoised: torch.Tensor,
        sigma: float,
        sigma_next: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not hasattr(self, "_previous"):
            self.reset_history()
        lam_s = max(sigma, SIGMA_FLOOR)
        if sigma_next == 0:
            self._remember(lam_s, denoised)
            return denoised
        lam_t = max(sigma_next, SIGMA_FLOOR)
        scale_s, scale_t = er_sde_noise_scale(lam_s), er_sde_noise_scale(lam_t)
        ratio = float(scale_t / scale_s) if scale_s > 0 else 0.0
        x = ratio * x + (1 - ratio) * denoised
        if self._previous:
            x = x + self._higher_order(lam_s, lam_t, float(scale_t), denoised)
        variance = lam_t**2 - (lam_s * ratio) ** 2
        if variance > 0:
            x = x + math.sqrt(variance) * self.noise_like(x, generator)
        self._remember(lam_s, denoised)
        return x

    def _higher_order(
        self, lam_s: float, lam_t: float, scale_t: float, denoised: torch.Tensor
    ) -> torch.Tensor:
        """The stage-2 (and, with two earlier x0, stage-3) correction."""
        gap = lam_t - lam_s
        first, second = er_sde_integrals(lam_s, lam_t)
        lam_before, denoised_before = self._previous[-1]
        if abs(lam_s - lam_before) <= 1e-12:
            return torch.zeros_like(denoised)
        slope = (denoised - denoised_before) / (lam_s - lam_before)
        correction = (gap + first * scale_t) * slope
        if self._previous_slope is not None and len(self._previous) >= 2:
            half_span = (lam_s - self._previous[-2][0]) / 2
            if abs(half_span) > 1e-12:
                curvature = (slope - self._previous_slope) / half_span
                correction = correction + (gap**2 / 2 + second * scale_t) * curvature
        self._previous_slope = slope
        return correction

    def _remember(self, lam: float, denoised: torch.Tensor) -> None:
        self._previous = [*self._previous[-(ER_SDE_MAX_STAGE - 2) :], (lam, denoised)]


class CFGPPScheduler(SigmaSpaceScheduler):
    """CFG++'s renoising direction, (x - x0_uncond) / sigma, for a step whose x0 is the
    guided one.

    `unconditional_output` holds the UNet's unconditional output for the coming step (set by
    `unconditional_capture`); without it (no guidance) the direction is the plain one. With
    `conditional_output` and `guidance` set too, the step mixes the guided prediction itself,
    uncond + guidance (cond - uncond), whatever the pipeline mixed: that lets a guidance
    below 1 (the paper's lambda range) run, where diffusers would skip the unconditional
    pass (the pipeline is then called with a scale above 1 only to run it).
    """

    unconditional_output: torch.Tensor | None = None
    conditional_output: torch.Tensor | None = None
    guidance: float | None = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Any:
        conditional, self.conditional_output = self.conditional_output, None
        unconditional = self.unconditional_output
        if conditional is not None and unconditional is not None and self.guidance is not None:
            model_output = unconditional + self.guidance * (conditional - unconditional)
        return super().step(model_output, timestep, sample, generator, return_dict)

    def direction(self, x: torch.Tensor, sigma: float, guided: torch.Tensor) -> torch.Tensor:
        raw = self.unconditional_output
        self.unconditional_output = None
        unconditional = guided if raw is None else self.denoised(raw.to(torch.float32), x, sigma)
        return (x - unconditional) / sigma


class EulerCFGPPScheduler(CFGPPScheduler):
    """Euler CFG++: x_next = x0_guided + sigma_next * (x - x0_uncond) / sigma."""

    def advance(
        self,
        x: torch.Tensor,
        denoised: torch.Tensor,
        sigma: float,
        sigma_next: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return denoised + sigma_next * self.direction(x, sigma, denoised)


def ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step with eta 1 (k-diffusion's split)."""
    if sigma <= 0:
        return sigma_next, 0.0
    up = min(sigma_next, math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2), 0.0)) / sigma)
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


class EulerAncestralScheduler(SigmaSpaceScheduler):
    """Euler ancestral (k-diffusion's `sample_euler_ancestral`, eta 1): down to sigma_down
    along the direction, then fresh noise of sigma_up. The same step as diffusers'
    EulerAncestralDiscreteScheduler, but on Euler's schedule options (Karras, exponential),
    which that class lacks."""

    def advance(
        self,
        x: torch.Tensor,
        denoised: torch.Tensor,
        sigma: float,
        sigma_next: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        down, up = ancestral_step(sigma, sigma_next)
        x = denoised + down * self.direction(x, sigma, denoised)
        if sigma_next > 0:
            x = x + up * self.noise_like(x, generator)
        return x


class EulerAncestralCFGPPScheduler(CFGPPScheduler, EulerAncestralScheduler):
    """Euler ancestral CFG++: the ancestral step along CFG++'s unconditional direction."""


@contextmanager
def unconditional_capture(pipeline: Any, guidance: float | None = None) -> Iterator[None]:
    """While the block runs, hand a CFG++ scheduler the unconditional and conditional
    halves of each UNet output of this thread's pipeline call, and the request's guidance
    (`cfgScale`, CFG++'s lambda) to mix them with; no-op for any other scheduler.

    The hook sits on the shared UNet only for the request and is removed in `finally`; it
    ignores calls from other threads (another job on the same model).
    """
    scheduler = pipeline.scheduler
    if not isinstance(scheduler, CFGPPScheduler):
        yield
        return
    thread = threading.get_ident()

    def keep_unconditional(_module: Any, _args: Any, output: Any) -> None:
        if threading.get_ident() != thread:
            return
        prediction = output[0]
        # diffusers batches [unconditional, conditional] when it guides.
        if pipeline.do_classifier_free_guidance:
            unconditional, conditional = prediction.chunk(2)
            scheduler.unconditional_output = unconditional
            scheduler.conditional_output = conditional
        else:
            scheduler.unconditional_output = prediction

    scheduler.guidance = guidance
    handle = pipeline.unet.register_forward_hook(keep_unconditional)
    try:
        yield
    finally:
        handle.remove()
        scheduler.unconditional_output = scheduler.conditional_output = None
        scheduler.guidance = None
