"""A models dir over real HTTP: GET /v1/models, a model per request, the LRU of loaded ones.

Two small models shaped like the built-in one with other weights (tests/support/model_dir.py):
`alpha` (a diffusers folder) and `beta` (one .safetensors file). The same request on the
same model gives the same bytes, whatever was drawn in between.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from diffusiond.backends.builtin_model import ensure_builtin_model
from diffusiond.client import Client
from diffusiond.testing.deployment import Deployment, start_api, start_redis, start_worker
from diffusiond.testing.waits import eventually
from tests.support.model_dir import UNET_WEIGHTS, two_model_dir
from tests.support.server import REPO_ROOT, ServerProcess, poll_until, server_env, start_server

SMALL = {"prompt": "a red door", "width": 64, "height": 64, "steps": 3, "seed": 5}
API_KEY = "models-test-key-0123456789"


@pytest.fixture(scope="module")
def models_dir(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_model_dir(model_home, tmp_path_factory.mktemp("models"))


def _model_args(model_home: Path, models_dir: Path) -> tuple[str, ...]:
    # The test models have the built-in model's shapes: their single file needs its config.
    return (
        "--models-dir",
        str(models_dir),
        "--model-config",
        str(ensure_builtin_model(model_home)),
        "--torch-threads",
        "1",
    )


@pytest.fixture(scope="module")
def one_loaded(model_home: Path, models_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        model_home, *_model_args(model_home, models_dir), env={"IMAGE_MAX_LOADED_MODELS": "1"}
    )
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture(scope="module")
def two_loaded(model_home: Path, models_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        model_home,
        *_model_args(model_home, models_dir),
        env={"IMAGE_MAX_LOADED_MODELS": "2", "IMAGE_API_KEY": API_KEY},
    )
    yield process
    assert process.stop() == 0, process.text()


def run(http: httpx.Client, **fields: Any) -> list[dict[str, Any]]:
    """POST SMALL with `fields`, poll it to its end; every state seen (the last complete)."""
    response = http.post("/v1/images/generations", json={**SMALL, **fields})
    assert response.status_code == 201, response.text
    seen = poll_until(http, response.json()["id"], interval_s=0.005)
    assert seen[-1]["status"] == "complete", seen[-1]
    return seen


def png_of(state: dict[str, Any]) -> bytes:
    return base64.b64decode(state["result"]["images"][0]["image"])


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as picture:
        return picture.convert("RGB").tobytes()


def loading_ms(state: dict[str, Any]) -> int:
    return int(state["result"]["timings"]["loadingMs"])


def models(http: httpx.Client) -> dict[str, dict[str, Any]]:
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["models"]}


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_the_models_dir_is_listed_with_the_builtin_model_as_default(
    one_loaded: ServerProcess,
) -> None:
    with one_loaded.client() as http:
        listed = models(http)
    assert list(listed) == ["builtin", "alpha", "beta"]  # no loras/, text file, empty folder
    assert listed["alpha"]["format"] == "diffusers"
    assert listed["beta"]["format"] == "safetensors"
    assert {entry["architecture"] for entry in listed.values()} == {"sd1"}
    assert [i for i, entry in listed.items() if entry["default"]] == ["builtin"]
    assert all("path" not in entry for entry in listed.values())  # no key, no paths


def test_the_client_and_the_cli_list_the_models(one_loaded: ServerProcess) -> None:
    with Client(one_loaded.url) as client:
        listed = client.models()
    assert [(m.id, m.format, m.default) for m in listed] == [
        ("builtin", "builtin", True),
        ("alpha", "diffusers", False),
        ("beta", "safetensors", False),
    ]
    finished = subprocess.run(
        [sys.executable, "-m", "diffusiond", "models", "--json", "--server", one_loaded.url],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert [entry["id"] for entry in json.loads(finished.stdout)] == ["builtin", "alpha", "beta"]


def test_switching_models_per_request_and_back_gives_the_same_bytes(
    one_loaded: ServerProcess,
) -> None:
    with one_loaded.client() as http:
        first_alpha = run(http, model="alpha")
        assert models(http)["alpha"]["loaded"] is True
        assert models(http)["builtin"]["loaded"] is False  # one loaded at most
        beta = run(http, model="beta")
        assert http.get("/health").json()["loadedModels"] == ["beta"]
        again_alpha = run(http, model="alpha")
        repeat_alpha = run(http, model="alpha")
        builtin = run(http)
    assert png_of(again_alpha[-1]) == png_of(first_alpha[-1])
    assert png_of(repeat_alpha[-1]) == png_of(first_alpha[-1])
    drawn = {pixels(png_of(state[-1])) for state in (first_alpha, beta, builtin)}
    assert len(drawn) == 3  # three models, three pictures
    # A switch loads the model inside the job: its `loading` stage, in its timings.
    switch = again_alpha
    assert any(
        s["status"] == "in_progress" and (s.get("progress") or {}).get("stage") == "loading"
        for s in switch
    ), [s.get("progress") for s in switch]
    assert loading_ms(switch[-1]) > 2 * loading_ms(repeat_alpha[-1])
    assert loading_ms(switch[-1]) >= 50


def test_an_unknown_model_is_a_400_naming_the_field_and_the_ids(
    one_loaded: ServerProcess,
) -> None:
    with one_loaded.client() as http:
        response = http.post("/v1/images/generations", json={**SMALL, "model": "gamma"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["details"]["field"] == "model"
    for model_id in ("builtin", "alpha", "beta"):
        assert model_id in error["message"]


def test_the_recipe_names_the_model_and_its_hash_and_from_png_picks_it_again(
    one_loaded: ServerProcess, models_dir: Path, tmp_path: Path
) -> None:
    with one_loaded.client() as http:
        alpha = png_of(run(http, model="alpha")[-1])
        beta = png_of(run(http, model="beta")[-1])
    for png, model_id, weights in (
        (alpha, "alpha", models_dir / "alpha" / UNET_WEIGHTS),
        (beta, "beta", models_dir / "beta.safetensors"),
    ):
        with Image.open(io.BytesIO(png)) as picture:
            text = dict(picture.text)  # type: ignore[attr-defined]
        recipe = json.loads(text["diffusiond"])
        assert (recipe["model"], recipe["modelHash"]) == (model_id, short_hash(weights))
        assert f"Model hash: {short_hash(weights)}, Model: {model_id}," in text["parameters"]
    source = tmp_path / "beta.png"
    source.write_bytes(beta)
    out = tmp_path / "out"
    command = ["generate", "--from-png", str(source), "--server", one_loaded.url, "-o", str(out)]
    finished = subprocess.run(
        [sys.executable, "-m", "diffusiond", *command],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
        timeout=180,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    (again,) = out.glob("*.png")
    assert again.read_bytes() == beta


def test_a_model_copied_into_the_dir_while_serving_is_usable_at_once(
    one_loaded: ServerProcess, models_dir: Path
) -> None:
    gamma = models_dir / "gamma.safetensors"
    shutil.copyfile(models_dir / "beta.safetensors", gamma)
    try:
        with one_loaded.client() as http:
            assert "gamma" in models(http)
            state = run(http, model="gamma")[-1]
            assert json.loads(_recipe_text(png_of(state)))["model"] == "gamma"
            gamma.unlink()
            gone = http.post("/v1/images/generations", json={**SMALL, "model": "gamma"})
        assert gone.status_code == 400
        assert gone.json()["error"]["details"]["field"] == "model"
    finally:
        gamma.unlink(missing_ok=True)


def _recipe_text(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as picture:
        return str(picture.text["diffusiond"])  # type: ignore[attr-defined]


def test_two_loaded_models_switch_without_reloading_and_draw_the_same_bytes(
    one_loaded: ServerProcess, two_loaded: ServerProcess, models_dir: Path
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with one_loaded.client() as http:
        reference = png_of(run(http, model="alpha")[-1])
    with httpx.Client(base_url=two_loaded.url, timeout=30, headers=headers) as http:
        first = run(http, model="alpha")
        run(http, model="beta")
        assert set(http.get("/health").json()["loadedModels"]) == {"alpha", "beta"}
        back = run(http, model="alpha")  # still loaded: no load in this job
        listed = models(http)
    assert png_of(first[-1]) == reference == png_of(back[-1])
    assert loading_ms(first[-1]) > 2 * loading_ms(back[-1])
    assert {i for i, entry in listed.items() if entry["loaded"]} == {"alpha", "beta"}
    # With the API key, the paths too.
    assert listed["alpha"]["path"] == str(models_dir / "alpha")
    assert listed["builtin"]["path"] is None


def test_broker_mode_runs_a_job_naming_another_model_on_a_worker(
    model_home: Path,
    models_dir: Path,
    one_loaded: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with one_loaded.client() as http:
        reference = png_of(run(http, model="beta")[-1])
    cluster = Deployment(start_redis(tmp_path_factory.mktemp("redis")))
    try:
        args = _model_args(model_home, models_dir)
        cluster.workers.append(start_worker(model_home, cluster.redis.url, *args))
        cluster.apis.append(start_api(model_home, cluster.redis.url, *args[:2]))
        with cluster.apis[0].client() as http:
            assert list(models(http)) == ["builtin", "alpha", "beta"]
            refused = http.post("/v1/images/generations", json={**SMALL, "model": "gamma"})
            assert refused.status_code == 400
            assert refused.json()["error"]["details"]["field"] == "model"
            state = run(http, model="beta")[-1]
            assert png_of(state) == reference
            assert loading_ms(state) >= 50  # the worker loaded beta inside the job
            eventually(
                lambda: models(http)["beta"]["loaded"],
                timeout=60,
                interval=0.2,
                message="the worker never reported beta loaded",
            )
    finally:
        failures = cluster.stop()
    assert failures == [], "\n".join(failures)


def test_the_automatic1111_api_lists_the_models_and_draws_with_the_one_named(
    one_loaded: ServerProcess, models_dir: Path
) -> None:
    with one_loaded.client() as http:
        listed = http.get("/sdapi/v1/sd-models").json()
        assert [entry["model_name"] for entry in listed] == ["builtin", "alpha", "beta"]
        beta_title = listed[2]["title"]
        body = {"prompt": "a red door", "width": 64, "height": 64, "steps": 3, "seed": 5}
        body["override_settings"] = {"sd_model_checkpoint": beta_title}
        response = http.post("/sdapi/v1/txt2img", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()
    png = base64.b64decode(answer["images"][0])
    recipe = json.loads(_recipe_text(png))
    assert (recipe["model"], recipe["modelHash"]) == (
        "beta",
        short_hash(models_dir / "beta.safetensors"),
    )
    assert json.loads(answer["info"])["sd_model_name"] == "beta"
