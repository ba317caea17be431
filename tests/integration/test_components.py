"""Split components over real HTTP: each family's tiny model written as the files people
download (tests/support/component_models.py), served from a models-dir folder with a
components.json next to the same model as a diffusers folder, and once from the flags
(`--diffusion-model`, `--vae`, `--llm`), and as a ComfyUI-style single file. The same
weights draw the same picture either way;
a GGUF diffusion model draws within quantization error; the listing names each role's file;
a job shows progress, cancels, reproduces its seed; a wrong sampler is a 400; a model that
cannot be built fails its job naming the file."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusiond.backends.components import MANIFEST_NAME
from diffusiond.backends.families import FAMILIES
from diffusiond.testing.requests import GENERATIONS, submit
from tests.support.component_models import component_folder, single_file
from tests.support.families import tiny_family_folder
from tests.support.server import ServerProcess, poll_until, start_server, wait_first_step

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 5}
LONG = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 150, "seed": 2}


@pytest.fixture(scope="module")
def models_dir(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family as a diffusers folder (`FAMILY`), as components (`parts-FAMILY`) and
    with a Q8_0 GGUF diffusion model (`parts-FAMILY-q8`; a T5 there is a GGUF carrying its
    tokenizer); an SD 3 single file; a components folder whose T5 has no tokenizer."""
    models = tmp_path_factory.mktemp("components")
    for family in sorted(FAMILIES):
        shutil.copytree(tiny_family_folder(model_home, family), models / family)
        shutil.copytree(component_folder(model_home, family), models / f"parts-{family}")
        t5 = "t5xxl" in FAMILIES[family].text_encoders
        quantized = component_folder(model_home, family, fmt="gguf-q8_0", gguf_text=t5)
        shutil.copytree(quantized, models / f"parts-{family}-q8")
    sd3_parts = models / "parts-sd3"
    single_file(sd3_parts, models / "sd3-single.safetensors")
    single_file(sd3_parts, models / "sd3-alone.safetensors", only_diffusion_model=True)
    untokenized = models / "parts-chroma-untokenized"
    shutil.copytree(models / "parts-chroma", untokenized)
    manifest = json.loads((untokenized / MANIFEST_NAME).read_text())
    del manifest["tokenizers"]
    (untokenized / MANIFEST_NAME).write_text(json.dumps(manifest))
    return models


@pytest.fixture(scope="module")
def server(model_home: Path, models_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        model_home,
        "--models-dir",
        str(models_dir),
        "--tokenizers",  # for the single files, which carry none
        str(models_dir / "parts-sd3" / "tokenizers"),
        "--torch-threads",
        "1",
        env={"IMAGE_MAX_LOADED_MODELS": "4"},
    )
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def draw(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    return poll_until(http, submit(http, body))[-1]


def png_of(job: dict[str, Any]) -> bytes:
    assert job["status"] == "complete", job
    return base64.b64decode(job["result"]["images"][0]["image"])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def psnr(left: bytes, right: bytes) -> float:
    error = float(np.mean((pixels(left) - pixels(right)) ** 2))
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


def test_the_listing_names_each_roles_file(http: httpx.Client) -> None:
    listed = {model["id"]: model for model in http.get("/v1/models").json()["models"]}
    flux = listed["parts-flux1"]
    assert (flux["format"], flux["architecture"]) == ("components", "flux1")
    assert flux["components"] == {
        "diffusion_model": "flux1-transformer.safetensors",
        "vae": "vae.safetensors",
        "clip_l": "clip_l.safetensors",
        "t5xxl": "t5xxl.safetensors",
    }
    assert "path" not in flux  # paths only with the API key
    assert listed["parts-flux1-q8"]["components"]["t5xxl"] == "t5xxl.gguf"
    for family in FAMILIES:
        assert listed[f"parts-{family}"]["architecture"] == family
        assert "components" not in listed[family]  # a diffusers folder has none


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_components_draw_the_folders_picture(http: httpx.Client, family: str) -> None:
    folder = png_of(draw(http, {**SMALL, "model": family}))
    parts = draw(http, {**SMALL, "model": f"parts-{family}"})
    assert parts["result"]["images"][0]["seed"] == SMALL["seed"]
    # the PNGs' recipes name their models: the pixels are compared
    assert np.array_equal(pixels(png_of(parts)), pixels(folder))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_q8_gguf_draws_within_quantization_error_and_reproduces(
    http: httpx.Client, family: str
) -> None:
    model = f"parts-{family}-q8"
    folder = png_of(draw(http, {**SMALL, "model": family}))
    first = png_of(draw(http, {**SMALL, "model": model}))
    again = png_of(draw(http, {**SMALL, "model": model}))
    other = png_of(draw(http, {**SMALL, "model": model, "seed": 6}))
    assert first == again
    assert first != other
    assert psnr(first, folder) > 40, psnr(first, folder)  # measured 51.9-59.1 dB


def test_a_components_job_shows_progress_and_cancels(http: httpx.Client) -> None:
    job_id = submit(http, {**LONG, "model": "parts-zimage", "sampler": "euler"})
    wait_first_step(http, job_id)
    assert http.get(f"{GENERATIONS}/{job_id}").json()["progress"]["totalSteps"] == 150
    assert http.delete(f"{GENERATIONS}/{job_id}").json()["status"] == "cancelled"


def test_a_sampler_the_family_cannot_run_is_a_400(http: httpx.Client) -> None:
    response = http.post(GENERATIONS, json={**SMALL, "model": "parts-flux1", "sampler": "heun"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["details"]["field"] == "sampler"
    assert "euler" in error["message"]


def test_a_comfyui_single_file_draws_the_folders_picture(http: httpx.Client) -> None:
    listed = {model["id"]: model for model in http.get("/v1/models").json()["models"]}
    assert (listed["sd3-single"]["format"], listed["sd3-single"]["architecture"]) == (
        "safetensors",
        "sd3",
    )
    folder = png_of(draw(http, {**SMALL, "model": "sd3"}))
    single = png_of(draw(http, {**SMALL, "model": "sd3-single"}))
    assert np.array_equal(pixels(single), pixels(folder))


def test_a_single_file_of_the_diffusion_model_alone_asks_for_the_rest(http: httpx.Client) -> None:
    job = draw(http, {**SMALL, "model": "sd3-alone"})
    assert job["status"] == "error", job
    assert "without its vae, clip_l, clip_g, t5xxl" in job["error"]["message"]


def test_a_t5_without_a_tokenizer_fails_its_job_naming_the_role(http: httpx.Client) -> None:
    job = draw(http, {**SMALL, "model": "parts-chroma-untokenized"})
    assert job["status"] == "error", job
    message = job["error"]["message"]
    assert "t5xxl" in message
    assert "tokenizer" in message
    assert "Traceback" not in message


def test_the_flags_make_the_default_model(model_home: Path, models_dir: Path) -> None:
    """--diffusion-model with --vae and --llm, its tokenizer from --tokenizers: the default,
    named by the diffusion model's stem, its files in /health."""
    parts = component_folder(model_home, "zimage")
    files = json.loads((parts / MANIFEST_NAME).read_text())
    process = start_server(
        model_home,
        "--diffusion-model",
        str(parts / files["diffusion_model"]),
        "--vae",
        str(parts / files["vae"]),
        "--llm",
        str(parts / files["llm"]),
        "--tokenizers",
        str(parts / files["tokenizers"]),
        "--torch-threads",
        "1",
    )
    try:
        with process.client() as client:
            health = client.get("/health").json()
            assert health["architecture"] == "zimage"
            assert health["components"] == {
                "diffusion_model": "zimage-transformer.safetensors",
                "vae": "vae.safetensors",
                "llm": "llm.safetensors",
            }
            default = [m for m in client.get("/v1/models").json()["models"] if m["default"]]
            assert [m["id"] for m in default] == ["zimage-transformer"]
            job = draw(client, SMALL)
            assert job["status"] == "complete", job
    finally:
        assert process.stop() == 0, process.text()
