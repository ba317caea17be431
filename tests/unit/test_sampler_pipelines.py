"""The new schedulers and clip skip inside real diffusers pipelines of the built-in model
(and a tiny SDXL): image-to-image starts at the right sigma and runs int(steps x strength)
steps; the SD clip-skip encoding is diffusers' own at skip 0 and differs at skip 1."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from diffusiond.backends.builtin_model import ensure_builtin_model
from diffusiond.backends.clip_skip import encoded_at_layer, pipeline_clip_skip
from diffusiond.backends.k_samplers import ERSDEScheduler, EulerCFGPPScheduler
from tests.support.model_files import tiny_sdxl_folder


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("sampler-pipelines")


@pytest.fixture(scope="module")
def sd(home: Path) -> Any:
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(ensure_builtin_model(home)),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def record_sigmas(scheduler: Any) -> list[float]:
    """The sigma of every step `scheduler` takes from now on (its step, wrapped)."""
    used: list[float] = []
    step = scheduler.step

    @functools.wraps(step)  # keeps the signature the pipeline inspects
    def noting(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        used.append(float(scheduler.sigmas[scheduler.step_index - 1]))
        return out

    scheduler.step = noting
    return used


@pytest.mark.parametrize("scheduler_class", [ERSDEScheduler, EulerCFGPPScheduler])
def test_img2img_starts_at_the_strength_sigma_and_runs_the_tail(
    sd: Any, scheduler_class: type[Any]
) -> None:
    scheduler = scheduler_class.from_config(sd.scheduler.config)
    used = record_sigmas(scheduler)
    edit = StableDiffusionImg2ImgPipeline.from_pipe(sd, scheduler=scheduler)
    edit.set_progress_bar_config(disable=True)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))
    edit(
        "a boat",
        image=picture,
        strength=0.5,
        num_inference_steps=6,
        guidance_scale=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    full = scheduler_class.from_config(sd.scheduler.config)
    full.set_timesteps(6)
    assert used == pytest.approx([float(s) for s in full.sigmas[3:6]])


def test_sd_clip_skip_encoding_is_diffusers_own_at_skip_0(sd: Any) -> None:
    with torch.inference_mode():
        ours = encoded_at_layer(sd, "a red fox", 0)
        theirs, _ = sd.encode_prompt("a red fox", "cpu", 1, False)
        skipped = encoded_at_layer(sd, "a red fox", 1)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(skipped, theirs)
    assert pipeline_clip_skip(sd, 2, sdxl=False) == 1
    assert pipeline_clip_skip(sd, 12, sdxl=False) == 1  # 2 layers: clamped


def test_sdxl_clip_skip_goes_through_diffusers(home: Path) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipeline = StableDiffusionXLPipeline.from_pretrained(
        str(tiny_sdxl_folder(home)), local_files_only=True
    )
    # The tiny SDXL's encoders have 2 layers, all SDXL's default penultimate leaves: give
    # them a third so that one more can be skipped.
    torch.manual_seed(0)
    for name, model_class in (
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ):
        config = getattr(pipeline, name).config
        config.num_hidden_layers = 3
        setattr(pipeline, name, model_class(config))
    assert pipeline_clip_skip(pipeline, 1, sdxl=True) is None
    assert pipeline_clip_skip(pipeline, 12, sdxl=True) == 1  # clamped
    with torch.inference_mode():
        plain = pipeline.encode_prompt("a red fox", device="cpu", do_classifier_free_guidance=False)
        skipped = pipeline.encode_prompt(
            "a red fox", device="cpu", do_classifier_free_guidance=False, clip_skip=1
        )
    assert not torch.allclose(plain[0], skipped[0])
