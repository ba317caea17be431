"""The seed system's samplers, the schedulers and clip skip over HTTP with the built-in model
(random weights: what is checked is that a choice changes the picture, that a seed gives the
same bytes twice, the steps an edit runs, and the 400s)."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusiond.client import Client
from tests.support.server import ServerProcess, poll_until, wait_idle

GENERATIONS = "/v1/images/generations"
NEW_SAMPLERS = ["er_sde", "euler_cfg_pp", "euler_a_cfg_pp"]
SMALL = {"prompt": "a lighthouse at dusk", "seed": 11, "width": 64, "height": 64, "steps": 3}


def run(client: httpx.Client, body: dict[str, Any]) -> tuple[bytes, list[dict[str, Any]]]:
    """The first image's pixels (the PNG's recipe names the choices, so PNGs always differ)
    and the states polled on the way."""
    response = client.post(GENERATIONS, json={**SMALL, **body})
    assert response.status_code == 201, response.text
    seen = poll_until(client, response.json()["id"], interval_s=0.01)
    assert seen[-1]["status"] == "complete", seen[-1]
    png = base64.b64decode(seen[-1]["result"]["images"][0]["image"])
    with Image.open(io.BytesIO(png)) as picture:
        return picture.convert("RGB").tobytes(), seen


def image(client: httpx.Client, body: dict[str, Any]) -> bytes:
    return run(client, body)[0]


@pytest.fixture(scope="module")
def euler(server: ServerProcess) -> bytes:
    """The plain euler picture every choice is compared with, drawn once."""
    with server.client() as http:
        wait_idle(http)
        return image(http, {"sampler": "euler"})


@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
def test_each_new_sampler_differs_from_euler_and_repeats_per_seed(
    client: httpx.Client, euler: bytes, sampler: str
) -> None:
    first = image(client, {"sampler": sampler})
    assert first != euler
    assert image(client, {"sampler": sampler}) == first


def test_cfg_pp_guides_below_1_as_the_paper_lambda(client: httpx.Client) -> None:
    """Below 1 diffusers' samplers do not guide at all (euler at 0.6 is euler at 1); CFG++
    does, with lambda = cfgScale, so its 0.6 picture is not its 1 picture."""
    for sampler, guides in (("euler", False), ("euler_cfg_pp", True)):
        low = image(client, {"sampler": sampler, "cfgScale": 0.6})
        one = image(client, {"sampler": sampler, "cfgScale": 1})
        assert (low != one) is guides, sampler


@pytest.mark.parametrize("scheduler", ["karras", "exponential", "sgm_uniform", "simple"])
def test_each_scheduler_differs_from_discrete_and_repeats(
    client: httpx.Client, euler: bytes, scheduler: str
) -> None:
    first = image(client, {"sampler": "euler", "scheduler": scheduler})
    assert first != euler
    assert image(client, {"sampler": "euler", "scheduler": scheduler}) == first


def test_a_new_sampler_takes_a_scheduler(client: httpx.Client) -> None:
    discrete = image(client, {"sampler": "er_sde", "seed": 12})
    assert image(client, {"sampler": "er_sde", "seed": 12, "scheduler": "karras"}) != discrete


def test_clip_skip_2_differs_from_1_and_1_is_the_default(
    client: httpx.Client, euler: bytes
) -> None:
    assert image(client, {"sampler": "euler", "clipSkip": 1}) == euler
    skipped = image(client, {"sampler": "euler", "clipSkip": 2})
    assert skipped != euler
    # The built-in text encoder has 2 layers: a deeper skip is clamped to the same one.
    assert image(client, {"sampler": "euler", "clipSkip": 12}) == skipped


def noise_png(width: int, height: int) -> str:
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMG2IMG = {"initImage": noise_png(64, 64), "steps": 6, "strength": 0.5}


def test_img2img_with_the_new_samplers_runs_steps_times_strength(client: httpx.Client) -> None:
    euler_edit = image(client, {**IMG2IMG, "sampler": "euler"})
    for sampler in NEW_SAMPLERS:
        edited, seen = run(client, {**IMG2IMG, "sampler": sampler})
        diffusing = [s["progress"] for s in seen if s["status"] == "in_progress"]
        diffusing = [p for p in diffusing if p["stage"] == "diffusion"]
        assert diffusing, "no diffusion progress was seen"
        assert {p["totalSteps"] for p in diffusing} == {3}, sampler
        assert edited != euler_edit, sampler
    assert (
        image(client, {**IMG2IMG, "sampler": "er_sde"})
        == run(client, {**IMG2IMG, "sampler": "er_sde"})[0]
    )


def test_inpainting_with_a_new_sampler_completes(client: httpx.Client) -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body = {
        "sampler": "euler_a_cfg_pp",
        "initImage": noise_png(64, 64),
        "maskImage": base64.b64encode(buffer.getvalue()).decode(),
        "strength": 0.75,
    }
    assert image(client, body) != image(client, {**body, "sampler": "euler"})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"scheduler": "beta"}, "scheduler must be one of discrete, karras"),
        ({"sampler": "lcm", "scheduler": "karras"}, "cannot be used with sampler lcm"),
        ({"sampler": "ddim", "scheduler": "exponential"}, "cannot be used with sampler ddim"),
        ({"sampler": "euler_cfg"}, "sampler must be one of"),
    ],
)
def test_a_bad_scheduler_is_a_400_naming_it(
    client: httpx.Client, body: dict[str, Any], needle: str
) -> None:
    response = client.post(GENERATIONS, json={**SMALL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert needle in error["message"]
    assert error["details"]["field"] == ("sampler" if "sampler must" in needle else "scheduler")


def test_get_samplers_lists_samplers_and_schedulers(client: httpx.Client) -> None:
    response = client.get("/v1/samplers")
    assert response.status_code == 200
    body = response.json()
    assert body["schedulers"] == ["discrete", "karras", "exponential", "sgm_uniform", "simple"]
    assert {"euler_a", "euler", "lcm", *NEW_SAMPLERS} <= set(body["samplers"])
    with Client(str(client.base_url)) as python_client:
        listed = python_client.samplers()
    assert list(listed.samplers) == body["samplers"]
    assert list(listed.schedulers) == body["schedulers"]
    document = client.get("/openapi.json").json()
    assert "get" in document["paths"]["/v1/samplers"]
    sampler_enum = document["components"]["schemas"]["Samplers"]["properties"]["samplers"]
    assert sampler_enum["items"]["enum"] == body["samplers"]
