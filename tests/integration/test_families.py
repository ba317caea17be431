"""Each flow-matching family's tiny model served over real HTTP, on the family's own diffusers
pipeline: one server over a models dir of all of them (a request names its model), and one
started with `--model FOLDER`. A job shows progress and previews, cancels within its steps,
reproduces from its seed, edits an image where diffusers can; a sampler the family cannot
run is a 400 naming the ones it can."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from diffusiond.backends.families import FAMILIES, edit_pipeline_name, samplers_for_family
from diffusiond.testing.requests import GENERATIONS, submit
from diffusiond.testing.waits import eventually
from tests.support.families import tiny_family_folder
from tests.support.server import ServerProcess, poll_until, start_server, wait_first_step

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "cfgScale": 3.0}
# Long enough (seconds a step on the tiny models) for a cancel to land mid-diffusion.
LONG = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 150, "seed": 2}


@dataclass(frozen=True)
class FamilyClient:
    """An HTTP client for one family's tiny model on the shared server: every body it sends
    names that model."""

    http: httpx.Client
    family: str

    def submit(self, body: dict[str, Any]) -> str:
        return submit(self.http, {**body, "model": self.family})


@pytest.fixture(scope="module")
def families_server(
    model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server over a models dir of every family's tiny model, all kept loaded: a request
    names its family's model. One torch thread: these models' steps are tiny operations,
    which a second thread on a busy machine slows more than it helps (15x in a measured
    FLUX.2 job)."""
    models = tmp_path_factory.mktemp("families")
    for family in sorted(FAMILIES):
        shutil.copytree(tiny_family_folder(model_home, family), models / family)
    server = start_server(
        model_home,
        "--models-dir",
        str(models),
        "--torch-threads",
        "1",
        env={"IMAGE_MAX_LOADED_MODELS": str(len(FAMILIES))},
    )
    yield server
    assert server.stop() == 0, server.text()


@pytest.fixture(params=sorted(FAMILIES))
def family_client(
    request: pytest.FixtureRequest, families_server: ServerProcess
) -> Iterator[FamilyClient]:
    with families_server.client() as http:
        yield FamilyClient(http, request.param)


def family_of(client: FamilyClient) -> str:
    return client.family


def run(client: FamilyClient, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen = poll_until(client.http, client.submit(body))
    return seen[-1], seen


def test_a_family_folder_given_as_model_is_served_and_named_in_health(model_home: Path) -> None:
    server = start_server(
        model_home, "--model", str(tiny_family_folder(model_home, "flux1")), "--torch-threads", "1"
    )
    try:
        with server.client() as http:
            assert http.get("/health").json()["architecture"] == "flux1"
            seen = poll_until(http, submit(http, {**SMALL, "seed": 1}))
            assert seen[-1]["status"] == "complete", seen[-1]
    finally:
        assert server.stop() == 0, server.text()


def first_png(job: dict[str, Any]) -> bytes:
    assert job["status"] == "complete", job
    return base64.b64decode(job["result"]["images"][0]["image"])


def test_a_job_runs_through_progress_and_previews(family_client: FamilyClient) -> None:
    # 60 steps: a tiny model's few steps can all pass between two polls
    job, seen = run(family_client, {**SMALL, "seed": 1, "steps": 60, "previewEvery": 1})
    picture = Image.open(io.BytesIO(first_png(job)))
    assert picture.size == (64, 64)
    recipe = json.loads(picture.text["diffusiond"])  # type: ignore[attr-defined]
    assert (recipe["architecture"], recipe["model"]) == (family_client.family,) * 2
    diffusing = [
        body["progress"]
        for body in seen
        if body["status"] == "in_progress" and body["progress"]["stage"] == "diffusion"
    ]
    assert {progress["totalSteps"] for progress in diffusing} == {60}


def test_a_running_job_shows_live_previews(family_client: FamilyClient) -> None:
    """Waited for on a long job: a short one's steps can all pass between two polls."""
    http = family_client.http
    job_id = family_client.submit({**SMALL, "seed": 1, "steps": 150, "previewEvery": 1})

    def preview() -> dict[str, Any] | None:
        body = http.get(f"{GENERATIONS}/{job_id}").json()
        assert body["status"] in ("pending", "in_progress"), body
        return (body.get("progress") or {}).get("preview")

    shown = eventually(preview, timeout=120, message="a live preview")
    assert shown is not None
    assert shown["format"] == "jpeg"
    assert base64.b64decode(shown["image"])[:2] == b"\xff\xd8"  # a JPEG's first bytes
    assert http.delete(f"{GENERATIONS}/{job_id}").json()["status"] == "cancelled"


@pytest.mark.parametrize("sampler", ["euler_a", "lcm"])  # both draw fresh noise each step
def test_the_same_seed_gives_the_same_bytes(family_client: FamilyClient, sampler: str) -> None:
    body = {**SMALL, "sampler": sampler}
    first = first_png(run(family_client, {**body, "seed": 7})[0])
    again = first_png(run(family_client, {**body, "seed": 7})[0])
    other = first_png(run(family_client, {**body, "seed": 8})[0])
    assert first == again
    assert first != other


def test_a_job_cancels_within_its_steps(family_client: FamilyClient) -> None:
    http = family_client.http
    job_id = family_client.submit(LONG)
    wait_first_step(http, job_id)
    assert http.delete(f"{GENERATIONS}/{job_id}").json()["status"] == "cancelled"
    final = poll_until(http, job_id)[-1]
    assert final["status"] == "cancelled"
    assert "result" not in final or final["result"] is None


def test_a_sampler_the_family_cannot_run_is_a_400_naming_the_ones_it_can(
    family_client: FamilyClient,
) -> None:
    family = family_of(family_client)
    body = {**SMALL, "sampler": "ddim", "model": family}
    response = family_client.http.post(GENERATIONS, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["details"]["field"] == "sampler"
    assert "'ddim'" in error["message"]
    assert ", ".join(samplers_for_family(family)) in error["message"]
    assert not [
        job
        for job in family_client.http.get(GENERATIONS).json()["generations"]
        if job["status"] == "error"
    ]


def test_every_sampler_the_family_lists_draws(family_client: FamilyClient) -> None:
    for sampler in samplers_for_family(family_of(family_client)):
        job, _ = run(family_client, {**SMALL, "steps": 2, "seed": 3, "sampler": sampler})
        assert job["status"] == "complete", (sampler, job)


def png_b64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_inpainting_keeps_the_unmasked_pixels_where_diffusers_can(
    family_client: FamilyClient,
) -> None:
    family = FAMILIES[family_of(family_client)]
    init = Image.effect_noise((64, 64), 60).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    body = {**SMALL, "seed": 4, "initImage": png_b64(init), "strength": 0.5}
    masked = {**body, "maskImage": png_b64(mask), "maskBlur": 0}
    if edit_pipeline_name(family, inpaint=True) is None:
        refused = family_client.http.post(GENERATIONS, json={**masked, "model": family.name})
        assert refused.status_code == 400, refused.text
        assert "inpainting is not available" in refused.json()["error"]["message"]
    else:
        job, _ = run(family_client, masked)
        result = Image.open(io.BytesIO(first_png(job))).convert("RGB")
        assert result.crop((0, 0, 16, 16)).tobytes() == init.crop((0, 0, 16, 16)).tobytes()
        assert result.crop((24, 24, 40, 40)).tobytes() != init.crop((24, 24, 40, 40)).tobytes()
    redrawn = first_png(run(family_client, body)[0])
    assert Image.open(io.BytesIO(redrawn)).size == (64, 64)
