"""The AUTOMATIC1111 API (/sdapi/v1) driven by the real `webuiapi` client against the real
server and the built-in model: batches and seeds, img2img, inpainting, progress from
another thread, interrupt, the lists and options, png-info, waiting its turn, hang-ups."""

from __future__ import annotations

import base64
import io
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import webuiapi  # type: ignore[import-untyped]  # no stubs, no py.typed
from PIL import Image

from diffusiond.testing.waits import eventually
from tests.integration.test_editing import BLUR, HOLE, INIT, far_from_hole, hole_mask
from tests.support.broker import deploy
from tests.support.server import ServerProcess, poll_until, wait_first_step, wait_idle

SMALL = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 2, "cfg_scale": 7}
GENERATIONS = "/v1/images/generations"


@pytest.fixture
def api(server: ServerProcess, client: httpx.Client) -> webuiapi.WebUIApi:
    """The A1111 client of the shared server (idle before and after, see `client`)."""
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=2)


def raw_images(result: webuiapi.WebUIApiResult) -> list[bytes]:
    return [base64.b64decode(image) for image in result.json["images"]]


def job_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"{GENERATIONS}/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_txt2img_batches_follow_the_seed_and_repeat_exactly(
    api: webuiapi.WebUIApi, client: httpx.Client
) -> None:
    first = api.txt2img(**SMALL, seed=11, batch_size=2, n_iter=2)
    assert len(first.images) == 4
    assert all(image.size == (64, 64) for image in first.images)
    assert first.info["all_seeds"] == [11, 12, 13, 14]
    assert first.info["seed"] == 11
    assert len(first.info["infotexts"]) == 4
    assert "Seed: 13" in first.info["infotexts"][2]
    assert first.parameters["n_iter"] == 2
    # One ordinary job per iteration, listed and complete, each of batch_size images.
    assert len(first.info["job_ids"]) == 2
    for job_id in first.info["job_ids"]:
        job = job_of(client, job_id)
        assert job["status"] == "complete"
        assert len(job["result"]["images"]) == 2
    again = api.txt2img(**SMALL, seed=11, batch_size=2, n_iter=2)
    assert raw_images(again) == raw_images(first)
    other = api.txt2img(**SMALL, seed=12, batch_size=1)
    assert raw_images(other) == raw_images(first)[1:2]


def test_a_random_seed_is_reported(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(**SMALL, seed=-1, batch_size=2)
    seeds = result.info["all_seeds"]
    assert seeds[1] == seeds[0] + 1 or seeds == [2**32 - 1, 0]
    assert result.info["seed"] == seeds[0]


def test_img2img_redraws_the_init_image_at_the_size_asked(api: webuiapi.WebUIApi) -> None:
    result = api.img2img(
        images=[INIT], prompt="a boat", width=128, height=80, denoising_strength=0.5, seed=3
    )
    (picture,) = result.images
    assert picture.size == (128, 80)
    assert not np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(INIT))
    assert result.parameters["init_images"] is None
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]


def test_inpainting_keeps_the_unmasked_pixels_exactly(api: webuiapi.WebUIApi) -> None:
    common: dict[str, Any] = {
        "images": [INIT],
        "prompt": "a door",
        "width": INIT.width,
        "height": INIT.height,
        "denoising_strength": 0.8,
        "mask_blur": BLUR,
        "seed": 5,
    }
    result = api.img2img(**common, mask_image=hole_mask(INIT.width, INIT.height))
    drawn = np.asarray(result.image.convert("RGB"))
    keep = far_from_hole(INIT.width, INIT.height)
    assert np.array_equal(drawn[keep], np.asarray(INIT)[keep])
    left, top, right, bottom = HOLE
    assert not np.array_equal(
        drawn[top:bottom, left:right], np.asarray(INIT)[top:bottom, left:right]
    )
    # Inverted, the hole is what is kept: its middle (past the blur) comes back exactly.
    inverted = api.img2img(
        **common, mask_image=hole_mask(INIT.width, INIT.height), inpainting_mask_invert=1
    )
    kept = np.asarray(inverted.image.convert("RGB"))[top + 14 : bottom - 14, left + 14 : right - 14]
    assert kept.size
    assert np.array_equal(kept, np.asarray(INIT)[top + 14 : bottom - 14, left + 14 : right - 14])
    assert not np.array_equal(
        np.asarray(inverted.image.convert("RGB"))[keep], np.asarray(INIT)[keep]
    )


def run_in_thread(target: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """`target(*args, **kwargs)` on a thread; its result (or exception) lands in the list."""
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append(target(*args, **kwargs))
        except Exception as exc:  # the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


# Long enough to act on while it runs (150 steps at 512x512), short enough to stop quickly.
LONG_A1111 = {"prompt": "a long job", "width": 512, "height": 512, "steps": 150, "seed": 1}


def test_progress_advances_then_interrupt_ends_the_call(
    api: webuiapi.WebUIApi, client: httpx.Client
) -> None:
    thread, outcome = run_in_thread(api.txt2img, **LONG_A1111, n_iter=2)
    first = eventually(
        lambda: (p := api.get_progress())["state"]["sampling_step"] >= 1 and p, timeout=120
    )
    assert first["state"]["sampling_steps"] == LONG_A1111["steps"]
    assert first["state"]["job_count"] == 2
    assert 0 < first["progress"] < 0.5
    later = eventually(
        lambda: (
            (p := api.get_progress())["state"]["sampling_step"] > first["state"]["sampling_step"]
            and p
        ),
        timeout=60,
    )
    assert later["progress"] > first["progress"]
    assert later["eta_relative"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(later["current_image"]))).size[0] > 0
    skipped = api.session.get(f"{api.baseurl}/progress", params={"skip_current_image": "true"})
    assert skipped.json()["current_image"] is None
    job_id = later["state"]["job"]
    assert job_of(client, job_id)["status"] == "in_progress"
    api.interrupt()
    thread.join(timeout=60)
    (result,) = outcome
    assert result.images == []
    assert result.info["interrupted"] is True
    assert result.info["job_ids"] == [job_id]  # the second iteration never started
    assert job_of(client, job_id)["status"] == "cancelled"
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"]) == (0.0, 0)


def test_a_call_waits_its_turn_while_another_job_runs(
    api: webuiapi.WebUIApi, client: httpx.Client
) -> None:
    native = {**LONG_A1111, "negativePrompt": "", "cfgScale": 7}
    response = client.post(GENERATIONS, json=native)
    assert response.status_code == 201, response.text
    long_id = response.json()["id"]
    wait_first_step(client, long_id)
    thread, outcome = run_in_thread(api.txt2img, **SMALL, seed=4)
    step = job_of(client, long_id)["progress"]["currentStep"]
    poll_until(client, long_id, lambda body: body["progress"]["currentStep"] > step + 1)
    assert thread.is_alive()
    assert not outcome
    assert client.delete(f"{GENERATIONS}/{long_id}").status_code == 200
    thread.join(timeout=60)
    (result,) = outcome
    assert len(result.images) == 1
    assert result.info["all_seeds"] == [4]


def test_a_client_that_hangs_up_leaves_no_job_running(
    server: ServerProcess, client: httpx.Client
) -> None:
    body = orjson.dumps(LONG_A1111)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = (
            f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        connection.sendall(head.encode() + body)
        running = eventually(
            lambda: client.get(GENERATIONS, params={"status": "in_progress"}).json()["generations"],
            timeout=60,
        )
        wait_first_step(client, running[0]["id"])
    poll_until(client, running[0]["id"], lambda job: job["status"] == "cancelled", timeout_s=60)
    wait_idle(client)


def test_models_samplers_schedulers_and_options(api: webuiapi.WebUIApi) -> None:
    (model,) = api.get_sd_models()
    assert {"title", "model_name", "hash", "sha256", "filename"} <= set(model)
    assert api.util_get_current_model() == model["title"]
    api.util_set_model(model["model_name"])
    assert api.get_options()["sd_model_checkpoint"] == model["title"]
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC", "LCM", "Heun"} <= set(samplers)
    assert "automatic" in api.util_get_scheduler_names()
    assert api.get_upscalers() == []
    assert api.get_sd_vae() == []
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert isinstance(api.get_loras(), list)
    result = api.txt2img(
        **SMALL,
        seed=2,
        sampler_name="DPM++ 2M Karras",
        override_settings={"sd_model_checkpoint": model["title"]},
    )
    assert "Sampler: DPM++ 2M Karras" in result.info["infotexts"][0]


def test_bad_input_is_a_400_naming_the_field(api: webuiapi.WebUIApi) -> None:
    for field, payload in (
        ("sampler_name", {"sampler_name": "No Such Sampler"}),
        ("steps", {"steps": 0}),
        ("width", {"width": 100}),
        (
            "override_settings.sd_model_checkpoint",
            {"override_settings": {"sd_model_checkpoint": "x"}},
        ),
        ("enable_hr", {"enable_hr": True}),
    ):
        response = api.session.post(f"{api.baseurl}/txt2img", json={**SMALL, **payload})
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["field"] == field
        assert field.split(".")[-1] in error["detail"]
        assert "Traceback" not in response.text
    refused = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "nope"})
    assert refused.status_code == 400
    assert refused.json()["field"] == "sd_model_checkpoint"
    missing = api.session.get(f"{api.baseurl}/no-such-route")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})


def test_png_info_reads_back_the_parameters(api: webuiapi.WebUIApi) -> None:
    made = api.txt2img(**SMALL, seed=21, negative_prompt="fog")
    read = api.png_info(made.image)
    assert read.info.startswith("a red boat\nNegative prompt: fog\nSteps: 2")
    assert read.parameters["Seed"] == "21"
    assert (read.parameters["Size-1"], read.parameters["Size-2"]) == ("64", "64")
    assert read.parameters["Negative prompt"] == "fog"
    bad = api.session.post(f"{api.baseurl}/png-info", json={"image": "not base64!"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "image"


def test_through_the_broker_a_call_waits_its_turn_and_runs_ordinary_jobs(
    model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster = deploy(model_home, tmp_path_factory.mktemp("redis"), workers=1, apis=1)
    try:
        node = cluster.apis[0]
        api = webuiapi.WebUIApi(baseurl=f"{node.url}/sdapi/v1")
        with node.client() as http:
            response = http.post(GENERATIONS, json={**LONG_A1111, "cfgScale": 7})
            assert response.status_code == 201, response.text
            long_id = response.json()["id"]
            wait_first_step(http, long_id)
            thread, outcome = run_in_thread(api.txt2img, **SMALL, seed=8, n_iter=2)
            step = job_of(http, long_id)["progress"]["currentStep"]
            poll_until(http, long_id, lambda body: body["progress"]["currentStep"] > step + 1)
            assert thread.is_alive()
            assert http.delete(f"{GENERATIONS}/{long_id}").status_code == 200
            thread.join(timeout=120)
            (result,) = outcome
            assert result.info["all_seeds"] == [8, 9]
            assert len(result.images) == 2
            for job_id in result.info["job_ids"]:
                assert job_of(http, job_id)["status"] == "complete"
    finally:
        assert cluster.stop() == []
