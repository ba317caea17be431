"""The editing parts that need no model: steps, resizing, masks, paste-back, and the JSON
forms of an edit job in the job store and the broker's Redis."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.editing import (
    fit,
    mask_levels,
    paste_back,
    pipeline_strength,
    prepare_edit,
    steps_run,
)
from diffusiond.broker.mapping import request_from_json, request_to_json
from diffusiond.jobs.models import (
    EditInputs,
    GenerationRequest,
    InputImage,
    Job,
    JobStatus,
)
from diffusiond.jobs.store import SqliteStore


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    bands = len(mode)
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(array.squeeze() if bands == 1 else array, mode)


@pytest.mark.parametrize(
    ("steps", "strength", "run"),
    [(20, 0.5, 10), (20, 0.75, 15), (10, 0.01, 1), (10, 0.0, 1), (7, 1.0, 7), (49, 0.33, 16)],
)
def test_steps_run_is_int_steps_times_strength_at_least_one(
    steps: int, strength: float, run: int
) -> None:
    assert steps_run(steps, strength) == run
    # the strength handed to diffusers makes it run exactly that many
    assert int(steps * pipeline_strength(steps, run)) == run


def test_fit_crops_a_rounded_down_size_and_stretches_any_other() -> None:
    picture = noise(101, 83)
    cropped = fit(picture, 96, 80)
    assert np.array_equal(np.asarray(cropped), np.asarray(picture)[:80, :96])
    stretched = fit(picture, 64, 128)
    assert stretched.size == (64, 128)
    assert fit(picture, 101, 83) is picture


def test_a_mask_with_transparency_is_read_from_its_alpha() -> None:
    alpha_mask = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    alpha_mask.paste((0, 0, 0, 255), (0, 0, 4, 8))  # opaque black on the left: redraw
    levels = np.asarray(mask_levels(alpha_mask))
    assert levels[:, :4].min() == 255
    assert levels[:, 4:].max() == 0
    grey = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert np.asarray(mask_levels(grey)).min() == 255  # opaque: its brightness


def test_paste_back_keeps_every_pixel_where_the_mask_is_zero() -> None:
    init = noise(64, 48)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (20, 10, 40, 30))
    spec = ImageSpec("p", "", 64, 48, 10, 7.5, 1, "euler_a")
    edit = EditInputs(InputImage(png(init), 64, 48), 0.5, InputImage(png(mask), 64, 48), 3)
    prepared = prepare_edit(dataclasses.replace(spec, edit=edit), inpainting_unet=False)
    assert prepared is not None
    assert prepared.steps_run == 5
    result = paste_back(Image.new("RGB", (64, 48), (255, 0, 255)), prepared)
    out, original = np.asarray(result), np.asarray(init)
    assert prepared.mask is not None
    zero = np.asarray(prepared.mask) == 0
    assert np.array_equal(out[zero], original[zero])
    assert (out[20, 30] == (255, 0, 255)).all()  # inside: the result


def test_txt2img_on_an_inpainting_model_is_a_full_mask_at_strength_one() -> None:
    spec = ImageSpec("p", "", 64, 48, 10, 7.5, 1, "euler_a")
    assert prepare_edit(spec, inpainting_unet=False) is None
    prepared = prepare_edit(spec, inpainting_unet=True)
    assert prepared is not None
    assert (prepared.inpaint, prepared.strength, prepared.steps_run) == (True, 1.0, 10)
    assert prepared.call_kwargs(64, 48)["mask_image"].getextrema() == (255, 255)


EDIT = EditInputs(
    InputImage(png(noise(16, 16)), 16, 16), 0.4, InputImage(png(noise(16, 16, "L")), 16, 16), 2
)
REQUEST = GenerationRequest(prompt="p", width=64, height=64, edit=EDIT)


def test_an_edit_request_crosses_redis_as_json_unchanged() -> None:
    assert request_from_json(json.loads(json.dumps(request_to_json(REQUEST)))) == REQUEST
    plain = GenerationRequest(prompt="p")
    assert request_from_json(json.loads(json.dumps(request_to_json(plain)))) == plain


def test_a_pending_edit_job_is_restored_with_its_images(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    pending = Job("gen_1", REQUEST, JobStatus.PENDING, 1, 1)
    running = Job("gen_2", REQUEST, JobStatus.IN_PROGRESS, 1, 2, started_at=2)
    store = SqliteStore(path)
    store.put(pending)
    store.put(running)
    store.close()
    again = SqliteStore(path)
    try:
        restored = again.get("gen_1")
        assert restored is not None
        assert restored.request == REQUEST
        started = again.get("gen_2")
        assert started is not None
        # once started, the images are not written again (a restart ends it anyway)
        assert started.request.edit is None
    finally:
        again.close()
