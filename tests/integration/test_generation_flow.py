"""The job lifecycle over HTTP: start, poll, progress, results, batches and seeds."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import httpx
from PIL import Image

from tests.support.server import poll_until

SMALL = {"width": 64, "height": 64, "steps": 3}


def start(client: httpx.Client, **fields: Any) -> str:
    response = client.post("/v1/images/generations", json={"prompt": "a lighthouse", **fields})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def images_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    assert body["status"] == "complete", body
    images: list[dict[str, Any]] = body["result"]["images"]
    return images


def png_bytes(entry: dict[str, Any]) -> bytes:
    return base64.b64decode(entry["image"])


def test_post_returns_at_once_then_polls_through_progress_to_complete(
    client: httpx.Client,
) -> None:
    payload = {
        "prompt": "a lighthouse at dusk",
        "width": 256,
        "height": 192,
        "steps": 30,
        "seed": 11,
        "count": 2,
    }
    started = time.monotonic()
    response = client.post("/v1/images/generations", json=payload)
    post_seconds = time.monotonic() - started
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "status", "createdAt"}
    assert body["status"] == "pending"
    assert body["id"].startswith("gen_")
    assert response.headers["location"] == f"/v1/images/generations/{body['id']}"
    assert response.headers["content-type"] == "application/json"

    seen = poll_until(client, body["id"], interval_s=0.01)
    statuses = [state["status"] for state in seen]
    # The POST answered before the job finished: the first poll still saw it unfinished.
    assert statuses[0] in {"pending", "in_progress"}, (statuses[0], post_seconds)
    assert statuses[-1] == "complete"
    assert "in_progress" in statuses

    running = [state for state in seen if state["status"] == "in_progress"]
    assert all("progress" in state for state in running)
    percentages = [state["progress"]["percentage"] for state in running]
    assert percentages == sorted(percentages), "percentage went down while running"
    assert all(0 <= p < 100 for p in percentages)
    for state in running:
        progress = state["progress"]
        assert progress["stage"] in {"loading", "diffusion", "decoding"}
        assert 0 <= progress["currentStep"] <= progress["totalSteps"]
        assert progress["totalImages"] == 2
        assert progress["currentImage"] in {1, 2}
        if progress["stage"] == "diffusion":
            assert progress["totalSteps"] == 30
    assert {s["progress"]["currentImage"] for s in running} == {1, 2}
    assert "diffusion" in {s["progress"]["stage"] for s in running}
    updated = [state["updatedAt"] for state in seen]
    assert updated == sorted(updated)
    assert all(state["createdAt"] == body["createdAt"] for state in seen)

    final = seen[-1]
    assert final["updatedAt"] >= final["createdAt"]
    result = final["result"]
    assert result["format"] == "png"
    assert result["timeTaken"] > 0
    assert [image["seed"] for image in result["images"]] == [11, 12]
    for entry in result["images"]:
        assert (entry["width"], entry["height"]) == (256, 192)
        picture = Image.open(io.BytesIO(png_bytes(entry)))
        assert picture.format == "PNG"
        assert picture.size == (256, 192)
        assert picture.mode == "RGB"


def test_batch_image_equals_single_generation_with_that_seed(client: httpx.Client) -> None:
    batch = poll_until(client, start(client, seed=7, count=2, **SMALL))[-1]
    single = poll_until(client, start(client, seed=8, count=1, **SMALL))[-1]
    batch_images = images_of(batch)
    assert [entry["seed"] for entry in batch_images] == [7, 8]
    assert png_bytes(batch_images[1]) == png_bytes(images_of(single)[0])
    assert png_bytes(batch_images[0]) != png_bytes(batch_images[1])


def test_same_seed_and_parameters_give_identical_pixels(client: httpx.Client) -> None:
    first = images_of(poll_until(client, start(client, seed=123, **SMALL))[-1])
    second = images_of(poll_until(client, start(client, seed=123, **SMALL))[-1])
    other_prompt = images_of(
        poll_until(client, start(client, seed=123, prompt="a forest", **SMALL))[-1]
    )
    assert png_bytes(first[0]) == png_bytes(second[0])
    assert png_bytes(first[0]) != png_bytes(other_prompt[0])


def test_seeds_wrap_around_two_to_the_32(client: httpx.Client) -> None:
    body = poll_until(client, start(client, seed=4294967295, count=2, **SMALL))[-1]
    assert [entry["seed"] for entry in images_of(body)] == [4294967295, 0]


def test_random_seeds_are_reported_and_reproduce_their_image(client: httpx.Client) -> None:
    for seed in (None, -1):
        body = poll_until(client, start(client, seed=seed, count=2, **SMALL))[-1]
        images = images_of(body)
        seeds = [entry["seed"] for entry in images]
        assert all(0 <= seed <= 4294967295 for seed in seeds)
        assert seeds[0] != seeds[1]
        again = poll_until(client, start(client, seed=seeds[1], **SMALL))[-1]
        assert png_bytes(images_of(again)[0]) == png_bytes(images[1])


def test_every_sampler_completes(client: httpx.Client) -> None:
    samplers = [
        "euler_a",
        "euler",
        "heun",
        "dpm2",
        "dpm++2s_a",
        "dpm++2m",
        "dpm++2mv2",
        "lcm",
        "ddim",
        "unipc",
    ]
    pictures = {}
    for sampler in samplers:
        body = poll_until(client, start(client, sampler=sampler, seed=5, **SMALL))[-1]
        pictures[sampler] = png_bytes(images_of(body)[0])
    # A fresh scheduler per request: different samplers draw different pictures.
    assert len(set(pictures.values())) > 1


def test_guidance_off_and_negative_prompt_are_honoured(client: httpx.Client) -> None:
    plain = images_of(poll_until(client, start(client, seed=3, **SMALL))[-1])
    negative = images_of(
        poll_until(client, start(client, seed=3, negativePrompt="fog", **SMALL))[-1]
    )
    no_guidance = images_of(poll_until(client, start(client, seed=3, cfgScale=0, **SMALL))[-1])
    assert png_bytes(plain[0]) != png_bytes(negative[0])
    assert png_bytes(plain[0]) != png_bytes(no_guidance[0])


def test_list_is_newest_first_without_results(client: httpx.Client) -> None:
    first = start(client, **SMALL)
    poll_until(client, first)
    second = start(client, **SMALL)
    poll_until(client, second)
    response = client.get("/v1/images/generations")
    assert response.status_code == 200
    listed = response.json()["generations"]
    ids = [entry["id"] for entry in listed]
    assert ids.index(second) < ids.index(first)
    for entry in listed:
        assert set(entry) == {"id", "status", "createdAt", "updatedAt"}


def test_unknown_fields_are_ignored_and_not_echoed(client: httpx.Client) -> None:
    response = client.post(
        "/v1/images/generations",
        json={"prompt": "x", "clientTag": "abc", "steps": 2, "width": 64, "height": 64},
    )
    assert response.status_code == 201
    assert "clientTag" not in response.text
    final = poll_until(client, response.json()["id"])[-1]
    assert final["status"] == "complete"
    assert "clientTag" not in str(final.keys())


def test_nulls_take_defaults(client: httpx.Client) -> None:
    response = client.post(
        "/v1/images/generations",
        json={
            "prompt": "x",
            "negativePrompt": None,
            "cfgScale": None,
            "sampler": None,
            "count": None,
            "seed": None,
            "width": 64,
            "height": 64,
            "steps": 2,
        },
    )
    assert response.status_code == 201
    final = poll_until(client, response.json()["id"])[-1]
    assert len(images_of(final)) == 1


def test_health_reports_state_and_advice(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["busy"] is False
    assert body["pollIntervalMs"] == 500
    assert body["model"] == "diffusiond-builtin-v1"
    assert body["backend"] == "diffusers"
    assert body["maxBatch"] == 5
