"""Image-to-image and inpainting over HTTP with the built-in model (random weights: what
is checked does not depend on them: kept pixels, sizes, steps run, determinism, that the
init image matters, every 400), a tiny 9-channel inpainting model, and the broker mode."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.broker import deploy
from tests.support.model_files import tiny_inpainting_model_files
from tests.support.server import ServerProcess, poll_until, start_server

GENERATIONS = "/v1/images/generations"
BLUR = 4
# A pixel further than this from the mask is never touched by the blurred mask.
KEEP_DISTANCE = 3 * BLUR + 1
HOLE = (40, 24, 88, 56)  # left, top, right, bottom of the redrawn rectangle


def png_b64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hole_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, HOLE)
    return mask


def far_from_hole(width: int, height: int) -> np.ndarray:
    """True where a pixel is more than KEEP_DISTANCE from the hole."""
    near = np.zeros((height, width), dtype=bool)
    left, top, right, bottom = HOLE
    near[
        max(0, top - KEEP_DISTANCE) : bottom + KEEP_DISTANCE,
        max(0, left - KEEP_DISTANCE) : right + KEEP_DISTANCE,
    ] = True
    return ~near


def run(client: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The finished job (status complete) and every state polled on the way."""
    response = client.post(GENERATIONS, json={"prompt": "a red boat", "seed": 7, **body})
    assert response.status_code == 201, response.text
    seen = poll_until(client, response.json()["id"], interval_s=0.005)
    assert seen[-1]["status"] == "complete", seen[-1]
    return seen[-1], seen


def pixels(job: dict[str, Any], index: int = 0) -> np.ndarray:
    data = base64.b64decode(job["result"]["images"][index]["image"])
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGB"))


INIT = noise(128, 80, seed=1)
INPAINT = {
    "initImage": png_b64(INIT),
    "maskImage": png_b64(hole_mask(128, 80)),
    "maskBlur": BLUR,
    "strength": 0.8,
    "steps": 6,
}


def assert_kept_exactly(result: np.ndarray, init: Image.Image) -> None:
    original = np.asarray(init)
    far = far_from_hole(init.width, init.height)
    assert far.sum() > 0
    assert np.array_equal(result[far], original[far]), "a pixel outside the mask changed"
    left, top, right, bottom = HOLE
    inside = (slice(top + BLUR, bottom - BLUR), slice(left + BLUR, right - BLUR))
    assert not np.array_equal(result[inside], original[inside]), "the hole was not redrawn"


def test_inpainting_keeps_every_pixel_outside_the_mask_and_its_blur(
    client: httpx.Client,
) -> None:
    job, _ = run(client, {**INPAINT, "count": 2})
    for index in (0, 1):
        assert_kept_exactly(pixels(job, index), INIT)


def test_the_output_takes_the_init_image_size_or_the_asked_one(client: httpx.Client) -> None:
    odd = png_b64(noise(101, 83, seed=2))
    job, _ = run(client, {"initImage": odd, "steps": 2})
    image = job["result"]["images"][0]
    assert (image["width"], image["height"]) == (96, 80)
    assert pixels(job).shape == (80, 96, 3)
    job, _ = run(client, {"initImage": odd, "steps": 2, "width": 64, "height": 128})
    assert pixels(job).shape == (128, 64, 3)


def test_the_steps_run_are_steps_times_strength(client: httpx.Client) -> None:
    body = {"initImage": png_b64(noise(192, 192, seed=3)), "steps": 20, "strength": 0.5}
    _, seen = run(client, body)
    diffusing = [s["progress"] for s in seen if s["status"] == "in_progress"]
    diffusing = [p for p in diffusing if p["stage"] == "diffusion"]
    assert diffusing, "no diffusion progress was seen"
    assert {p["totalSteps"] for p in diffusing} == {10}
    assert max(p["currentStep"] for p in diffusing) <= 10


def test_same_seed_and_inputs_give_the_same_bytes_and_the_inputs_matter(
    client: httpx.Client,
) -> None:
    body = {"initImage": png_b64(INIT), "strength": 0.6, "steps": 4}
    first, _ = run(client, body)
    again, _ = run(client, body)
    assert first["result"]["images"][0]["image"] == again["result"]["images"][0]["image"]
    other, _ = run(client, {**body, "initImage": png_b64(noise(128, 80, seed=99))})
    text, _ = run(client, {"steps": 4, "width": 128, "height": 80})
    reference = pixels(first)
    assert not np.array_equal(reference, pixels(other)), "another init image, the same result"
    assert not np.array_equal(reference, pixels(text)), "img2img drew what txt2img draws"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"initImage": "%%%"}, "initImage"),
        ({"initImage": "data:text/html;base64,PGI+"}, "initImage"),
        ({"initImage": base64.b64encode(b"GIF89a....").decode()}, "initImage"),
        ({"maskImage": png_b64(INIT)}, "maskImage"),
        ({"strength": 0.3}, "strength"),
        ({"initImage": png_b64(INIT), "strength": -0.1}, "strength"),
        ({"initImage": png_b64(INIT), "maskImage": png_b64(INIT), "maskBlur": 99}, "maskBlur"),
        ({"initImage": png_b64(INIT), "maskImage": png_b64(noise(64, 64, 5))}, "maskImage"),
    ],
)
def test_bad_edit_fields_are_400s_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = client.post(GENERATIONS, json={"prompt": "p", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["details"]["field"] == field
    assert error["details"]["rule"]
    assert "Traceback" not in response.text


def test_a_large_body_is_refused_from_its_content_length(
    model_home: Path,
) -> None:
    server = start_server(model_home, "--max-body-bytes", "100000")
    try:
        with server.client() as http:
            big = {"prompt": "p", "initImage": png_b64(noise(256, 256, seed=4))}
            response = http.post(GENERATIONS, json=big)
            assert response.status_code == 413, response.text
            assert "100000" in response.json()["error"]["message"]
            job, _ = run(http, {"initImage": png_b64(noise(64, 64, 6)), "steps": 1})
            assert pixels(job).shape == (64, 64, 3)
    finally:
        assert server.stop() == 0, server.text()


@pytest.fixture(scope="module")
def inpainting_server(model_home: Path) -> Iterator[ServerProcess]:
    folder, _ = tiny_inpainting_model_files(model_home)
    server = start_server(model_home, "--model", str(folder))
    yield server
    assert server.stop() == 0, server.text()


def test_a_nine_channel_inpainting_model_loads_and_serves_masked_requests(
    inpainting_server: ServerProcess,
) -> None:
    with inpainting_server.client() as http:
        assert http.get("/health").json()["model"].endswith("tiny-inpainting")
        job, _ = run(http, INPAINT)
        assert_kept_exactly(pixels(job), INIT)
        text, _ = run(http, {"steps": 2, "width": 64, "height": 64})  # and plain txt2img
        assert pixels(text).shape == (64, 64, 3)


def test_an_img2img_job_through_the_broker(
    model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster = deploy(model_home, tmp_path_factory.mktemp("redis"), workers=1, apis=1)
    try:
        with cluster.apis[0].client() as http:
            job, seen = run(http, {**INPAINT, "steps": 10, "strength": 0.5})
            assert_kept_exactly(pixels(job), INIT)
            totals = {
                s["progress"]["totalSteps"]
                for s in seen
                if s["status"] == "in_progress" and s["progress"]["stage"] == "diffusion"
            }
            assert totals <= {5}
    finally:
        assert cluster.stop() == []


def test_an_edit_job_shows_previews_and_cancels_within_its_steps(client: httpx.Client) -> None:
    body = {
        "prompt": "p",
        "initImage": png_b64(noise(512, 512, seed=5)),
        "strength": 1.0,
        "steps": 150,
        "previewEvery": 1,
    }
    response = client.post(GENERATIONS, json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    seen = poll_until(
        client,
        job_id,
        lambda state: (
            state["status"] == "in_progress"
            and "preview" in (state.get("progress") or {})
            and state["progress"]["currentStep"] >= 1
        ),
    )
    assert seen[-1]["progress"]["totalSteps"] == 150
    assert client.delete(f"{GENERATIONS}/{job_id}").json()["status"] == "cancelled"
    final = poll_until(client, job_id)[-1]
    assert final["status"] == "cancelled"


def test_a_queued_edit_job_runs_with_its_images_after_a_kill_and_restart(
    model_home: Path, tmp_path: Path
) -> None:
    store = f"sqlite:{tmp_path / 'jobs.db'}"
    long_job = {"prompt": "long", "width": 2048, "height": 2048, "steps": 150, "seed": 1}
    first = start_server(model_home, "--store", store, "--max-queue", "2")
    with first.client() as http:
        running = http.post(GENERATIONS, json=long_job)
        assert running.status_code == 201, running.text
        poll_until(http, running.json()["id"], lambda s: s["status"] == "in_progress")
        queued = http.post(GENERATIONS, json={"prompt": "a red boat", "seed": 7, **INPAINT})
        assert queued.status_code == 201, queued.text
    first.process.kill()  # SIGKILL: the queued job lives only in the store
    first.process.wait()
    second = start_server(model_home, "--store", store, "--max-queue", "2")
    try:
        with second.client() as http:
            job = poll_until(http, queued.json()["id"])[-1]
            assert job["status"] == "complete", job
            assert_kept_exactly(pixels(job), INIT)
    finally:
        assert second.stop() == 0, second.text()
