"""Each flow-matching family's tiny model served over real HTTP: `--model FOLDER` loads it on
the family's own diffusers pipeline; a job shows progress and previews, cancels within its
steps, reproduces from its seed, edits an image where diffusers can, and refuses a sampler
the family cannot run, naming the ones it can."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from diffusiond.backends.families import FAMILIES, edit_pipeline_name, samplers_for_family
from diffusiond.testing.requests import GENERATIONS, submit
from tests.support.families import tiny_family_folder
from tests.support.server import ServerProcess, poll_until, start_server, wait_first_step

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "cfgScale": 3.0}
# Long enough (seconds a step on the tiny models) for a cancel to land mid-diffusion.
LONG = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 150, "seed": 2}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_server(request: pytest.FixtureRequest, model_home: Path) -> Iterator[ServerProcess]:
    """A server on one family's tiny model; one family's tests run at a time. One torch
    thread: these models' steps are tiny operations, which a second thread on a busy
    machine slows more than it helps (15x in a measured FLUX.2 job)."""
    folder = tiny_family_folder(model_home, request.param)
    server = start_server(model_home, "--model", str(folder), "--torch-threads", "1")
    yield server
    assert server.stop() == 0, server.text()


@pytest.fixture
def family_client(family_server: ServerProcess) -> Iterator[httpx.Client]:
    with family_server.client() as http:
        yield http


def family_of(http: httpx.Client) -> str:
    return str(http.get("/health").json()["architecture"])


def run(http: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen = poll_until(http, submit(http, body))
    return seen[-1], seen


def first_png(job: dict[str, Any]) -> bytes:
    assert job["status"] == "complete", job
    return base64.b64decode(job["result"]["images"][0]["image"])


def test_a_job_runs_through_progress_and_previews(family_client: httpx.Client) -> None:
    health = family_client.get("/health").json()
    assert health["architecture"] in FAMILIES
    job, seen = run(family_client, {**SMALL, "seed": 1, "previewEvery": 1})
    picture = Image.open(io.BytesIO(first_png(job)))
    assert picture.size == (64, 64)
    recipe = json.loads(picture.text["diffusiond"])  # type: ignore[attr-defined]
    assert recipe["architecture"] == health["architecture"]
    diffusing = [
        body["progress"]
        for body in seen
        if body["status"] == "in_progress" and body["progress"]["stage"] == "diffusion"
    ]
    assert {progress["totalSteps"] for progress in diffusing} == {4}
    assert any("preview" in progress for progress in diffusing)


@pytest.mark.parametrize("sampler", ["euler_a", "lcm"])  # both draw fresh noise each step
def test_the_same_seed_gives_the_same_bytes(family_client: httpx.Client, sampler: str) -> None:
    body = {**SMALL, "sampler": sampler}
    first = first_png(run(family_client, {**body, "seed": 7})[0])
    again = first_png(run(family_client, {**body, "seed": 7})[0])
    other = first_png(run(family_client, {**body, "seed": 8})[0])
    assert first == again
    assert first != other


def test_a_job_cancels_within_its_steps(family_client: httpx.Client) -> None:
    job_id = submit(family_client, LONG)
    wait_first_step(family_client, job_id)
    assert family_client.delete(f"{GENERATIONS}/{job_id}").json()["status"] == "cancelled"
    final = poll_until(family_client, job_id)[-1]
    assert final["status"] == "cancelled"
    assert "result" not in final or final["result"] is None


def test_a_sampler_the_family_cannot_run_is_refused_naming_the_ones_it_can(
    family_client: httpx.Client,
) -> None:
    family = family_of(family_client)
    job, _ = run(family_client, {**SMALL, "sampler": "ddim"})
    assert job["status"] == "error"
    message = job["error"]["message"]
    assert "'ddim'" in message
    assert ", ".join(samplers_for_family(family)) in message


def test_every_sampler_the_family_lists_draws(family_client: httpx.Client) -> None:
    for sampler in samplers_for_family(family_of(family_client)):
        job, _ = run(family_client, {**SMALL, "steps": 2, "seed": 3, "sampler": sampler})
        assert job["status"] == "complete", (sampler, job)


def png_b64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_inpainting_keeps_the_unmasked_pixels_where_diffusers_can(
    family_client: httpx.Client,
) -> None:
    family = FAMILIES[family_of(family_client)]
    init = Image.effect_noise((64, 64), 60).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    body = {**SMALL, "seed": 4, "initImage": png_b64(init), "strength": 0.5}
    masked = {**body, "maskImage": png_b64(mask), "maskBlur": 0}
    job, _ = run(family_client, masked)
    if edit_pipeline_name(family, inpaint=True) is None:
        assert job["status"] == "error"
        assert "inpainting is not available" in job["error"]["message"]
    else:
        result = Image.open(io.BytesIO(first_png(job))).convert("RGB")
        assert result.crop((0, 0, 16, 16)).tobytes() == init.crop((0, 0, 16, 16)).tobytes()
        assert result.crop((24, 24, 40, 40)).tobytes() != init.crop((24, 24, 40, 40)).tobytes()
    redrawn = first_png(run(family_client, body)[0])
    assert Image.open(io.BytesIO(redrawn)).size == (64, 64)
