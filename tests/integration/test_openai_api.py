"""The OpenAI Images API (/openai/v1) over real HTTP, driven by the official `openai`
package against the real server and the built-in model: generations (n, sizes, formats,
url), edits with OpenAI's mask, streaming partial images, models, auth, busy, bad input,
and a client that hangs up mid-job (its job ends cancelled)."""

from __future__ import annotations

import base64
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from diffusiond.imaging import read_recipe
from diffusiond.testing.waits import eventually
from tests.integration.test_editing import HOLE, assert_kept_exactly, noise
from tests.support.broker import deploy
from tests.support.server import (
    ServerProcess,
    poll_until,
    start_server,
    wait_first_step,
    wait_idle,
)

GENERATIONS = "/v1/images/generations"
# A job of 30 steps that runs for seconds on the built-in model, long enough to hang up on.
LONG_SIZE, LONG_QUALITY = "1024x1024", "high"
RIGHT_KEY = "right-key-0123456789"


def sdk(server: ServerProcess, api_key: str = "unused") -> openai.OpenAI:
    # No retries: a test sees each answer as the server gave it.
    return openai.OpenAI(
        base_url=f"{server.url}/openai/v1", api_key=api_key, max_retries=0, timeout=300
    )


@pytest.fixture
def images(client: httpx.Client, server: ServerProcess) -> Iterator[openai.OpenAI]:
    """An SDK client of the shared server (idle before and after, as `client` ensures)."""
    with sdk(server) as ai:
        yield ai


def decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def newest_job(client: httpx.Client) -> dict[str, Any]:
    listed = client.get(GENERATIONS, params={"limit": 1}).json()["generations"]
    body: dict[str, Any] = client.get(f"{GENERATIONS}/{listed[0]['id']}").json()
    return body


def test_generations_make_n_images_of_the_size_as_an_ordinary_job(
    images: openai.OpenAI, client: httpx.Client
) -> None:
    answer = images.images.generate(
        prompt="a red boat", model="gpt-image-1", n=2, size="128x64", quality="low"
    )
    assert answer.data is not None
    assert len(answer.data) == 2
    pictures = [decoded(image.b64_json) for image in answer.data]
    assert all(p.format == "PNG" and p.size == (128, 64) for p in pictures)
    assert answer.size == "128x64"
    # The job is an ordinary one: listed, complete, its PNGs the ones answered.
    job = newest_job(client)
    assert job["status"] == "complete"
    stored = [base64.b64decode(image["image"]) for image in job["result"]["images"]]
    assert stored == [base64.b64decode(image.b64_json or "") for image in answer.data]
    recipe = read_recipe(stored[0])
    assert (recipe["steps"], recipe["width"], recipe["height"]) == (10, 128, 64)  # low: 10


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_and_compression(
    images: openai.OpenAI, output_format: Any, pil_format: str
) -> None:
    sizes = []
    for compression in (95, 10):
        answer = images.images.generate(
            prompt="a lighthouse",
            size="96x64",
            quality="low",
            output_format=output_format,
            output_compression=compression,
        )
        assert answer.data is not None
        assert answer.output_format == output_format
        picture = decoded(answer.data[0].b64_json)
        assert (picture.format, picture.size) == (pil_format, (96, 64))
        sizes.append(len(answer.data[0].b64_json or ""))
    assert sizes[1] < sizes[0], "a lower output_compression did not make a smaller file"


def test_url_answers_point_at_the_raw_image_endpoint(
    images: openai.OpenAI, server: ServerProcess
) -> None:
    answer = images.images.generate(
        prompt="two moons", n=2, size="64x64", quality="low", response_format="url"
    )
    assert answer.data is not None
    urls = [image.url or "" for image in answer.data]
    assert [urlsplit(url).path.rsplit("/", 1)[-1] for url in urls] == ["0", "1"]
    for url in urls:
        assert url.startswith(f"{server.url}{GENERATIONS}/")
        fetched = httpx.get(url, timeout=30)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


INIT = noise(128, 80, seed=1)


def openai_mask(width: int, height: int) -> Image.Image:
    """OpenAI's convention: opaque keeps, transparent (the HOLE) is redrawn."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), HOLE)
    return mask


def test_an_edit_with_a_mask_keeps_the_opaque_pixels_exactly(images: openai.OpenAI) -> None:
    answer = images.images.edit(
        image=("init.png", png_bytes(INIT), "image/png"),
        mask=("mask.png", png_bytes(openai_mask(128, 80)), "image/png"),
        prompt="a red boat",
        n=2,
        quality="low",
    )
    assert answer.data is not None
    assert len(answer.data) == 2
    for image in answer.data:
        result = np.asarray(decoded(image.b64_json).convert("RGB"))
        assert result.shape == (80, 128, 3)  # size auto: the image's own
        assert_kept_exactly(result, INIT)


def test_an_edit_without_a_mask_redraws_the_image_at_the_asked_size(
    images: openai.OpenAI,
) -> None:
    answer = images.images.edit(
        image=[("init.png", png_bytes(INIT), "image/png")],  # sent as image[]
        prompt="a red boat",
        size="64x64",
        quality="low",
    )
    assert answer.data is not None
    picture = decoded(answer.data[0].b64_json)
    assert picture.size == (64, 64)


def test_streaming_sends_partial_images_then_the_completed_one(images: openai.OpenAI) -> None:
    stream = images.images.generate(
        prompt="a forest", size="128x128", quality="medium", stream=True, partial_images=2
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed"
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partials) <= 2, kinds
    assert [e.partial_image_index for e in partials] == list(range(len(partials)))
    assert kinds == ["image_generation.partial_image"] * len(partials) + kinds[-1:]
    for event in events:
        assert event.output_format == "png"
        assert decoded(event.b64_json).format == "PNG"
    final = events[-1]
    assert final.size == "128x128"
    assert decoded(final.b64_json).size == (128, 128)


def test_an_edit_streams_its_own_event_types(images: openai.OpenAI) -> None:
    stream = images.images.edit(
        image=("init.png", png_bytes(INIT), "image/png"),
        prompt="a boat",
        quality="low",
        output_format="jpeg",
        stream=True,
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.completed"]
    assert decoded(events[0].b64_json).format == "JPEG"


def test_models_list_the_served_model(images: openai.OpenAI) -> None:
    listed = images.models.list()
    ids = [model.id for model in listed.data]
    assert len(ids) == 1
    model = images.models.retrieve(ids[0])
    assert (model.id, model.object, model.owned_by) == (ids[0], "model", "diffusiond")
    assert model.created > 0
    with pytest.raises(openai.NotFoundError):
        images.models.retrieve("dall-e-3")


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"n": 0}, "n"),
        ({"size": "100x100"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"output_format": "gif"}, "output_format"),
        ({"response_format": "xml"}, "response_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"prompt": ""}, "prompt"),
        ({"background": "striped"}, "background"),
    ],
)
def test_bad_input_is_a_400_naming_the_param(
    images: openai.OpenAI, arguments: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        images.images.generate(**{"prompt": "x", **arguments})
    assert refused.value.status_code == 400
    assert refused.value.param == param
    assert "Traceback" not in refused.value.response.text


def test_bad_edit_files_are_a_400_naming_the_param(images: openai.OpenAI) -> None:
    gif = io.BytesIO()
    INIT.save(gif, format="GIF")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"image": ("a.gif", gif.getvalue(), "image/gif")}, "image"),
        (
            {
                "image": ("a.png", png_bytes(INIT), "image/png"),
                "mask": ("m.png", png_bytes(INIT), "image/png"),  # RGB: no transparency
            },
            "mask",
        ),
        (
            {
                "image": ("a.png", png_bytes(INIT), "image/png"),
                "mask": ("m.png", png_bytes(openai_mask(64, 64)), "image/png"),
            },
            "mask",
        ),
        ({"image": [("a.png", png_bytes(INIT)), ("b.png", png_bytes(INIT))]}, "image"),
    ]
    for files, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            images.images.edit(prompt="x", **files)
        assert refused.value.param == param, refused.value.message


def test_a_busy_server_is_a_429_with_retry_after(
    images: openai.OpenAI, client: httpx.Client
) -> None:
    created = client.post(
        GENERATIONS, json={"prompt": "long", "width": 2048, "height": 2048, "steps": 150}
    )
    assert created.status_code == 201, created.text
    long_id = created.json()["id"]
    try:
        wait_first_step(client, long_id)
        with pytest.raises(openai.RateLimitError) as refused:
            images.images.generate(prompt="another", size="64x64")
        assert int(refused.value.response.headers["retry-after"]) >= 1
        body = refused.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
    finally:
        client.delete(f"{GENERATIONS}/{long_id}")


@pytest.fixture(scope="module")
def keyed_server(model_home: Path) -> Iterator[ServerProcess]:
    process = start_server(model_home, env={"IMAGE_API_KEY": RIGHT_KEY})
    yield process
    assert process.stop() == 0, process.text()


def test_the_api_key_guards_the_openai_routes(keyed_server: ServerProcess) -> None:
    with (
        sdk(keyed_server, "wrong-key-0123456789") as wrong,
        pytest.raises(openai.AuthenticationError) as no,
    ):
        wrong.images.generate(prompt="x", size="64x64", quality="low")
    error = no.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert RIGHT_KEY not in no.value.response.text
    for path in ("/openai/v1/models", "/openai/v1/images/edits"):
        assert httpx.get(f"{keyed_server.url}{path}").status_code == 401
    with sdk(keyed_server, RIGHT_KEY) as right:
        assert len(right.models.list().data) == 1
        answer = right.images.generate(prompt="x", size="64x64", quality="low")
        assert answer.data is not None
        assert decoded(answer.data[0].b64_json).size == (64, 64)


def running_job(client: httpx.Client) -> str:
    """The id of the job that is diffusing (the one the hung-up request started)."""
    found: list[str] = []

    def diffusing() -> bool:
        listed = client.get(GENERATIONS, params={"status": "in_progress"}).json()["generations"]
        found[:] = [entry["id"] for entry in listed]
        return len(found) == 1

    eventually(diffusing, timeout=60, message="the request started no job")
    wait_first_step(client, found[0])
    return found[0]


def assert_ends_cancelled(client: httpx.Client, job_id: str) -> None:
    assert poll_until(client, job_id)[-1]["status"] == "cancelled"
    wait_idle(client)


def test_a_client_that_hangs_up_has_its_job_cancelled(
    client: httpx.Client, server: ServerProcess
) -> None:
    address = urlsplit(server.url)
    body = json.dumps({"prompt": "nobody waits", "size": LONG_SIZE, "quality": LONG_QUALITY})
    request = (
        f"POST /openai/v1/images/generations HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection((address.hostname, address.port), timeout=30) as raw:
        raw.sendall(request.encode())
        job_id = running_job(client)
    assert_ends_cancelled(client, job_id)


def test_a_streaming_client_that_hangs_up_has_its_job_cancelled(
    client: httpx.Client, server: ServerProcess
) -> None:
    body = {"prompt": "nobody reads", "size": LONG_SIZE, "quality": LONG_QUALITY}
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/openai/v1/images/generations", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        job_id = running_job(client)
    assert_ends_cancelled(client, job_id)


def test_the_openai_routes_run_ordinary_jobs_in_broker_mode(
    model_home: Path, tmp_path: Path
) -> None:
    broker = deploy(model_home, tmp_path, workers=1, apis=1)
    try:
        api = broker.apis[0]
        with sdk(api) as ai, api.client() as client:
            events = list(
                ai.images.generate(
                    prompt="a harbour", n=2, size="64x64", quality="low", stream=True
                )
            )
            assert [event.type for event in events] == ["image_generation.completed"] * 2
            assert newest_job(client)["status"] == "complete"
            with (
                httpx.Client(base_url=api.url, timeout=30) as http,
                http.stream(
                    "POST",
                    "/openai/v1/images/generations",
                    json={
                        "prompt": "gone",
                        "size": LONG_SIZE,
                        "quality": LONG_QUALITY,
                        "stream": True,
                    },
                ),
            ):
                job_id = running_job(client)
            assert_ends_cancelled(client, job_id)
    finally:
        assert broker.stop() == []
