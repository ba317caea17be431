"""LoRAs and sigma schedules on the flow-matching families, over real HTTP: one server over
a models dir of every family's tiny model, with a LoRA folder (MODELS_DIR/loras) of a
diffusers-format LoRA for each family and a kohya-format FLUX.1 one (tests/support).

A LoRA changes the picture; a request without one (or at weight 0) gives the bytes of the
model before any LoRA was loaded; the same request gives the same bytes. karras and
exponential change the picture and reproduce; simple and sgm_uniform are the model's own
schedule. What a family cannot take is a 400 naming the field, before a job exists."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from diffusiond.backends.families import FAMILIES
from diffusiond.testing.requests import GENERATIONS, submit
from tests.support import flow_loras
from tests.support.families import tiny_family_folder
from tests.support.server import ServerProcess, poll_until, start_server, wait_idle

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 5}
KOHYA = "flux.kohya"  # a dot in the name: peft adapter names cannot hold one
KOHYA_SD3 = "sd3_kohya"


def own_lora(family: str) -> str:
    return f"{family}_style"


@pytest.fixture(scope="module")
def flow_server(
    model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Every family's tiny model kept loaded, one torch thread (see test_families.py)."""
    models = tmp_path_factory.mktemp("flow-loras")
    loras = models / "loras"
    loras.mkdir()
    for family in sorted(FAMILIES):
        folder = tiny_family_folder(model_home, family)
        shutil.copytree(folder, models / family)
        flow_loras.peft_lora(folder, family, loras / f"{own_lora(family)}.safetensors")
    flow_loras.kohya_flux_lora(loras / f"{KOHYA}.safetensors")
    flow_loras.kohya_sd3_lora(loras / f"{KOHYA_SD3}.safetensors")
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


# Each family's SMALL picture from the server before any LoRA was loaded into any model.
NEVER_GIVEN_A_LORA: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def http(flow_server: ServerProcess) -> Iterator[httpx.Client]:
    """The shared server's client; before any test runs, each model draws once plain."""
    with flow_server.client() as client:
        for family in sorted(FAMILIES):
            NEVER_GIVEN_A_LORA[family] = png(client, family)
        yield client
        wait_idle(client)
    NEVER_GIVEN_A_LORA.clear()


def png(http: httpx.Client, family: str, **fields: Any) -> bytes:
    body = poll_until(http, submit(http, {**SMALL, "model": family, **fields}))[-1]
    assert body["status"] == "complete", body
    return base64.b64decode(body["result"]["images"][0]["image"])


def pixels(made: bytes) -> bytes:
    """The picture's pixels (the PNG's recipe names the LoRAs and schedule, so bytes differ)."""
    return Image.open(io.BytesIO(made)).convert("RGB").tobytes()


def with_loras(*pairs: tuple[str, float]) -> dict[str, Any]:
    return {"loras": [{"name": name, "weight": weight} for name, weight in pairs]}


def refused(http: httpx.Client, family: str, **fields: Any) -> dict[str, Any]:
    response = http.post(GENERATIONS, json={**SMALL, "model": family, **fields})
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_the_loras_are_listed_with_their_family(http: httpx.Client) -> None:
    listed = {
        entry["name"]: entry["architecture"] for entry in http.get("/v1/loras").json()["loras"]
    }
    assert listed == {
        KOHYA: "flux1",
        KOHYA_SD3: "sd3",
        **{own_lora(family): family for family in FAMILIES},
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_lora_changes_the_picture_and_leaves_nothing_behind(
    http: httpx.Client, family: str
) -> None:
    never = NEVER_GIVEN_A_LORA[family]
    lora = with_loras((own_lora(family), 1.0))
    applied = png(http, family, **lora)
    assert pixels(applied) != pixels(never)
    assert png(http, family) == never
    assert png(http, family, **lora) == applied  # the cached adapter: the same bytes
    assert pixels(png(http, family, **with_loras((own_lora(family), 0.0)))) == pixels(never)
    assert pixels(png(http, family, **with_loras((own_lora(family), -1.5)))) not in (
        pixels(never),
        pixels(applied),
    )
    assert png(http, family) == never


@pytest.mark.parametrize("family", ["flux1", "chroma"])
def test_a_kohya_flux_lora_applies_to_flux1_and_chroma(http: httpx.Client, family: str) -> None:
    plain = NEVER_GIVEN_A_LORA[family]
    applied = png(http, family, **with_loras((KOHYA, 0.8)))
    assert pixels(applied) != pixels(plain)
    assert png(http, family, **with_loras((KOHYA, 0.8))) == applied
    assert png(http, family) == plain


@pytest.mark.parametrize(
    ("family", "lora", "says"),
    [
        ("sd3", own_lora("flux1"), "is a LoRA for flux1, and the model is sd3"),
        ("flux1", own_lora("chroma"), "is a LoRA for chroma, and the model is flux1"),
        ("qwenimage", KOHYA, "is a LoRA for flux1, and the model is qwenimage"),
        ("zimage", "nowhere", "no LoRA named 'nowhere'"),
        ("sd3", KOHYA_SD3, "kohya's layer names, which diffusers' LoRA loader for sd3"),
    ],
)
def test_a_lora_of_another_family_is_a_400_naming_loras(
    http: httpx.Client, family: str, lora: str, says: str
) -> None:
    error = refused(http, family, **with_loras((lora, 1.0)))
    assert error["details"]["field"] == "loras"
    assert says in error["message"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_schedule_changes_the_picture_and_reproduces(http: httpx.Client, family: str) -> None:
    own = pixels(NEVER_GIVEN_A_LORA[family])
    karras = png(http, family, scheduler="karras")
    exponential = png(http, family, scheduler="exponential", sampler="euler_a")
    assert len({own, pixels(karras), pixels(png(http, family, scheduler="exponential"))}) == 3
    assert png(http, family, scheduler="karras") == karras
    assert png(http, family, scheduler="exponential", sampler="euler_a") == exponential
    assert pixels(png(http, family, scheduler="simple")) == own
    assert pixels(png(http, family, scheduler="sgm_uniform")) == own


def test_a_lora_and_a_schedule_combine_on_an_edit(http: httpx.Client) -> None:
    init = Image.effect_noise((64, 64), 60).convert("RGB")
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    edit = {"initImage": base64.b64encode(buffer.getvalue()).decode(), "strength": 0.6}
    plain = png(http, "flux1", **edit)
    both = png(http, "flux1", **edit, scheduler="karras", **with_loras((KOHYA, 1.0)))
    assert pixels(both) != pixels(plain)
    assert png(http, "flux1", **edit) == plain


@pytest.mark.parametrize(
    ("family", "sampler", "scheduler", "says"),
    [
        ("flux1", "unipc", "karras", "unipc takes: discrete, sgm_uniform, simple"),
        ("sd3", "heun", "exponential", "the samplers that take exponential: euler, euler_a"),
        ("qwenimage", "unipc", "exponential", "'exponential' cannot run with sampler 'unipc'"),
        ("flux2", "dpm++2m", "karras", "FLUX.2 klein"),
        ("zimage", "lcm", "karras", "cannot be used with sampler lcm"),  # the API's own rule
    ],
)
def test_a_schedule_the_family_cannot_run_is_a_400_naming_scheduler(
    http: httpx.Client, family: str, sampler: str, scheduler: str, says: str
) -> None:
    error = refused(http, family, sampler=sampler, scheduler=scheduler)
    assert error["details"]["field"] == "scheduler"
    assert says in error["message"]
    jobs = http.get(GENERATIONS).json()["generations"]
    assert not [job for job in jobs if job["status"] == "error"]
