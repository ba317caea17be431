"""LoRAs per request, over real HTTP with the real server and the built-in model.

The LoRA files are made here (tests/support/loras.py) in both formats, for the built-in
model's architecture (sd1), plus one shaped for SDXL and one whose shapes fit no layer.
"""

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

from diffusiond.client import Client, png_parameters
from diffusiond.imaging import PNG_TEXT_KEY
from diffusiond.testing.deployment import start_api, start_redis, start_worker
from diffusiond.testing.requests import submit
from tests.support import loras
from tests.support.server import ServerProcess, poll_until, start_server, wait_idle

JOB: dict[str, Any] = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 11}
KOHYA = "detail.kohya"  # a dot in the name: peft adapter names cannot hold one
PEFT = "style_peft"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    loras.kohya(folder / f"{KOHYA}.safetensors")
    loras.peft(folder / f"{PEFT}.safetensors")
    loras.kohya(folder / "unet_only.safetensors", seed=5, rank_scale=0.5, text=False)
    loras.sdxl_header_lora(folder / "xl_only.safetensors")
    loras.misfit(folder / "misfit.safetensors")
    (folder / "notes.txt").write_text("not a LoRA")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 5)
    return folder


@pytest.fixture(scope="module")
def lora_server(model_home: Path, lora_dir: Path) -> Iterator[ServerProcess]:
    # bfloat16: where fusing would not give the same bits back; adapters must.
    process = start_server(model_home, "--loras-dir", str(lora_dir), "--dtype", "bfloat16")
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture
def http(lora_server: ServerProcess) -> Iterator[httpx.Client]:
    with lora_server.client() as client:
        wait_idle(client)
        yield client
        wait_idle(client)


def finished(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = poll_until(http, submit(http, {**JOB, **fields}))[-1]
    return body


def png(http: httpx.Client, **fields: Any) -> bytes:
    body = finished(http, **fields)
    assert body["status"] == "complete", body
    return base64.b64decode(body["result"]["images"][0]["image"])


def with_loras(*pairs: tuple[str, float]) -> dict[str, Any]:
    return {"loras": [{"name": name, "weight": weight} for name, weight in pairs]}


def test_lists_the_loras_of_the_folder_with_their_architecture(http: httpx.Client) -> None:
    response = http.get("/v1/loras")
    assert response.status_code == 200
    assert response.json() == {
        "loras": [
            {"name": KOHYA, "architecture": "sd1"},
            {"name": "misfit", "architecture": "sd1"},
            {"name": PEFT, "architecture": "sd1"},
            {"name": "unet_only", "architecture": "sd1"},
            {"name": "xl_only", "architecture": "sdxl"},
        ]
    }


def test_a_lora_changes_the_image_and_leaves_nothing_behind(http: httpx.Client) -> None:
    before = png(http)
    kohya = png(http, **with_loras((KOHYA, 1.0)))
    after_kohya = png(http)
    peft = png(http, **with_loras((PEFT, 0.8)))
    after_peft = png(http)
    assert kohya != before
    assert peft not in (before, kohya)
    assert after_kohya == before
    assert after_peft == before
    assert png(http, **with_loras((KOHYA, 1.0))) == kohya  # a LoRA again: the same image


def pixels(png_bytes: bytes) -> bytes:
    """The image's pixels (a PNG's text chunks name the LoRAs, so its bytes differ)."""
    return Image.open(io.BytesIO(png_bytes)).tobytes()


def test_weight_zero_is_the_image_without_the_lora(http: httpx.Client) -> None:
    assert pixels(png(http, **with_loras((KOHYA, 0.0)))) == pixels(png(http))
    with_zero = png(http, **with_loras((KOHYA, 0.0), (PEFT, 0.8)))
    assert pixels(with_zero) == pixels(png(http, **with_loras((PEFT, 0.8))))


def test_the_weight_matters_and_two_loras_combine(http: httpx.Client) -> None:
    half = png(http, **with_loras((KOHYA, 0.5)))
    full = png(http, **with_loras((KOHYA, 1.0)))
    both = png(http, **with_loras((KOHYA, 1.0), (PEFT, 0.8)))
    assert len({half, full, both, png(http, **with_loras((PEFT, 0.8)))}) == 4
    reordered = png(http, **with_loras((PEFT, 0.8), (KOHYA, 1.0)))
    assert pixels(reordered) == pixels(both)  # the order does not matter


def test_a_unet_only_lora_applies_alone_and_beside_another(http: httpx.Client) -> None:
    before = png(http)
    alone = png(http, **with_loras(("unet_only", 1.0)))
    beside = png(http, **with_loras(("unet_only", 1.0), (PEFT, 0.8)))
    assert len({before, alone, beside, png(http, **with_loras((PEFT, 0.8)))}) == 4
    assert png(http) == before


def test_the_recipe_names_each_lora_and_weight(http: httpx.Client) -> None:
    made = png(http, **with_loras((KOHYA, 1.0), (PEFT, -0.5)))
    picture = Image.open(io.BytesIO(made))
    recipe = json.loads(picture.info[PNG_TEXT_KEY])
    assert recipe["loras"] == [{"name": KOHYA, "weight": 1.0}, {"name": PEFT, "weight": -0.5}]
    assert f'Lora weights: "{KOHYA}: 1.0, {PEFT}: -0.5"' in picture.info["parameters"]
    assert png_parameters(made)["loras"] == [(KOHYA, 1.0), (PEFT, -0.5)]


@pytest.mark.parametrize(
    ("loras_field", "says"),
    [
        ([{"name": "nowhere", "weight": 1}], "no LoRA named 'nowhere'"),
        ([{"name": "xl_only", "weight": 1}], "'xl_only' is a LoRA for sdxl, and the model is sd1"),
        ([{"name": "notes", "weight": 1}], "no LoRA named 'notes'"),
        ([{"name": "broken", "weight": 1}], "no LoRA named 'broken'"),
        ([{"name": KOHYA, "weight": 1}, {"name": "nowhere", "weight": 0}], "'nowhere'"),
        ([{"name": KOHYA, "weight": 6}], "-5 to 5"),
    ],
)
def test_refused_loras_are_a_400_naming_loras(
    http: httpx.Client, loras_field: list[dict[str, Any]], says: str
) -> None:
    response = http.post("/v1/images/generations", json={**JOB, "loras": loras_field})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["details"]["field"] == "loras"
    assert says in error["message"]


def test_a_lora_added_while_running_is_found(http: httpx.Client, lora_dir: Path) -> None:
    loras.peft(lora_dir / "late.safetensors", seed=9)
    assert png(http, **with_loras(("late", 1.0))) != png(http)
    names = [entry["name"] for entry in http.get("/v1/loras").json()["loras"]]
    assert "late" in names


def test_a_lora_that_fails_to_load_fails_its_job_only(http: httpx.Client) -> None:
    before = png(http)
    body = finished(http, **with_loras((KOHYA, 1.0), ("misfit", 1.0)))
    assert body["status"] == "error", body
    assert "LoRA 'misfit' could not be applied" in body["error"]["message"]
    assert png(http) == before
    assert png(http, **with_loras((KOHYA, 1.0))) != before


def test_the_python_client_lists_and_applies_loras(lora_server: ServerProcess) -> None:
    with Client(lora_server.url) as client:
        assert [(lora.name, lora.architecture) for lora in client.loras()][:1] == [(KOHYA, "sd1")]
        plain = client.generate(**JOB)[0].png
        applied = client.generate(**JOB, loras=[(KOHYA, 1.0)])[0].png
    assert applied != plain


def test_broker_mode_applies_a_lora_on_a_worker(
    model_home: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    redis = start_redis(tmp_path_factory.mktemp("redis"))
    processes: list[ServerProcess] = []
    try:
        processes.append(start_worker(model_home, redis.url, "--loras-dir", str(lora_dir)))
        processes.append(start_api(model_home, redis.url, "--loras-dir", str(lora_dir)))
        with processes[-1].client() as http:
            assert http.get("/v1/loras").json()["loras"][0] == {
                "name": KOHYA,
                "architecture": "sd1",
            }
            plain = png(http)
            applied = png(http, **with_loras((KOHYA, 1.0)))
            assert applied != plain
            assert png(http) == plain
            wrong = http.post("/v1/images/generations", json={**JOB, **with_loras(("xl_only", 1))})
            assert wrong.status_code == 400
            assert wrong.json()["error"]["details"]["field"] == "loras"
    finally:
        codes = [process.stop() for process in reversed(processes)]
        redis.stop()
    assert all(code in (0, -9) for code in codes), [p.text() for p in processes]
