"""Pure parts of the live features: keys, event parsing, previews, recipes, timings, ETA."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
from PIL import Image

from diffusiond.api.idempotency import IdempotencyKeys, check_idempotency_key
from diffusiond.backends.previews import latents_to_preview
from diffusiond.client._protocol import EventReader
from diffusiond.engine.batch import run_batch
from diffusiond.errors import IdempotencyConflict, InvalidRequest
from diffusiond.imaging import encode_png, read_recipe, recipe_text
from diffusiond.jobs.models import GenerationRequest, Progress
from tests.support.fakes import FakeBackend

REQUEST = GenerationRequest(prompt="x", seed=1)


def test_idempotency_keys_replay_conflict_and_forget_with_the_job() -> None:
    alive = {"gen_a"}
    keys = IdempotencyKeys(lambda job_id: job_id in alive)
    assert keys.replay("k", REQUEST) is None
    keys.remember("k", REQUEST, "gen_a")
    assert keys.replay("k", REQUEST) == "gen_a"
    with pytest.raises(IdempotencyConflict, match="gen_a"):
        keys.replay("k", GenerationRequest(prompt="y"))
    alive.clear()  # the job expired: the key is free again
    assert keys.replay("k", GenerationRequest(prompt="y")) is None


def test_idempotency_keys_are_bounded() -> None:
    keys = IdempotencyKeys(lambda _job_id: True, max_keys=3)
    for n in range(5):
        keys.remember(f"k{n}", REQUEST, f"gen_{n}")
    assert keys.replay("k0", REQUEST) is None
    assert keys.replay("k4", REQUEST) == "gen_4"


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "tab\there", "ü"])
def test_bad_idempotency_keys_name_the_header(key: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_idempotency_key(key)
    assert caught.value.field == "Idempotency-Key"


def test_good_idempotency_keys() -> None:
    assert check_idempotency_key("a") == "a"
    assert check_idempotency_key("~" * 255) == "~" * 255


def test_event_reader_parses_events_and_skips_heartbeats() -> None:
    reader = EventReader()
    body = {"id": "gen_1", "status": "complete", "createdAt": 1}
    lines = [": heartbeat", "", "id: 7", "event: complete", f"data: {json.dumps(body)}", ""]
    seen = [reader.feed(line) for line in lines]
    found = [generation for generation in seen if generation is not None]
    assert len(found) == 1
    assert found[0].status == "complete"
    assert reader.last_id == "7"


@pytest.mark.parametrize(("height", "width", "size"), [(8, 12, (12, 8)), (64, 256, (128, 32))])
def test_previews_are_at_most_128_pixels(height: int, width: int, size: tuple[int, int]) -> None:
    latents = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(0))
    picture = latents_to_preview(latents)
    assert picture.size == size
    assert picture.mode == "RGB"
    bands = picture.getextrema()
    assert any(low != high for low, high in bands)  # type: ignore[misc]  # not one flat colour


def test_recipe_round_trips_through_png_text() -> None:
    recipe = {
        "prompt": "a café, at night",
        "negativePrompt": "",
        "width": 64,
        "height": 64,
        "steps": 3,
        "cfgScale": 7.5,
        "seed": 9,
        "sampler": "ddim",
        "model": "m",
        "version": "0",
    }
    png = encode_png(Image.new("RGB", (4, 4)), recipe_text(recipe))
    assert read_recipe(png) == recipe
    text = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
    assert text["parameters"].startswith("a café, at night\nSteps: 3, Sampler: ddim")


def test_recipe_names_scheduler_clip_skip_and_loras_and_the_client_reads_them() -> None:
    from diffusiond.backends.base import ImageSpec
    from diffusiond.client import png_parameters
    from diffusiond.engine.batch import image_recipe
    from diffusiond.jobs.models import LoraWeight

    spec = ImageSpec(
        "p", "", 64, 64, 3, 7.0, 9, "euler", model="other", scheduler="karras", clip_skip=2,
        loras=(LoraWeight("detail", 0.8),),
    )  # fmt: skip
    png = encode_png(Image.new("RGB", (4, 4)), image_recipe(spec, "other"))
    line = Image.open(io.BytesIO(png)).text["parameters"]  # type: ignore[attr-defined]
    assert "Schedule type: karras, Clip skip: 2" in line
    assert 'Lora weights: "detail: 0.8"' in line
    params = png_parameters(png)
    assert (params["scheduler"], params["clip_skip"]) == ("karras", 2)
    assert params["loras"] == [("detail", 0.8)]
    # the model only from a recipe that names it by catalog id (it has a model hash)
    assert "model" not in params
    hashed = image_recipe(spec, "other", model_hash="0123456789")
    assert png_parameters(encode_png(Image.new("RGB", (4, 4)), hashed))["model"] == "other"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image", "not a readable image"),
        (encode_png(Image.new("RGB", (4, 4))), "no 'diffusiond' text chunk"),
        (encode_png(Image.new("RGB", (4, 4)), {"diffusiond": "{"}), "not JSON"),
        (encode_png(Image.new("RGB", (4, 4)), {"diffusiond": "{}"}), "lacks the request"),
    ],
)
def test_read_recipe_says_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        read_recipe(data)


def test_stage_timings_add_up_per_stage() -> None:
    ticks = itertools.count(0, 0.001)  # every clock reading is one ms later
    reports: list[Progress] = []
    _images, timings = run_batch(
        FakeBackend(),
        GenerationRequest(prompt="x", seed=1, steps=3, count=2),
        report=reports.append,
        should_cancel=lambda: False,
        encode=lambda _image, _text: b"png",
        clock=lambda: next(ticks),
    )
    # Each stage is entered and left once per image, so 1 ms each, twice.
    assert (timings.loading_ms, timings.diffusion_ms, timings.decoding_ms) == (2, 2, 2)
    assert timings.encoding_ms == 2


def test_previews_ride_on_progress_reports() -> None:
    reports: list[Progress] = []
    run_batch(
        FakeBackend(),
        GenerationRequest(prompt="x", seed=1, steps=4, preview_every=2),
        report=reports.append,
        should_cancel=lambda: False,
        encode=lambda _image, _text: b"png",
        encode_preview=lambda picture: f"{picture.width}x{picture.height}".encode(),
    )
    previews = [r.preview for r in reports if r.preview is not None]
    assert [(p.step, p.jpeg) for p in previews] == [(2, b"8x4"), (4, b"8x4")]
