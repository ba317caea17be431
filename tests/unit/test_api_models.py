"""GET /v1/models and the `model` check at the route, over the real app and engine with a
model set of fake backends (the real pipeline: tests/integration/test_models_dir.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from diffusiond.api.app import ApiConfig, create_app
from diffusiond.backends.catalog import ModelCatalog, ModelEntry
from diffusiond.backends.model_set import ModelSet
from diffusiond.engine.engine import Engine
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.testing.requests import poll_until
from tests.support.fakes import FakeBackend
from tests.support.inprocess import in_process_api

KEY = "a-key-of-sixteen-chars"


def _make(_entry: ModelEntry) -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    return ModelCatalog(tmp_path)


def serve(catalog: ModelCatalog, api_key: str | None) -> Iterator[TestClient]:
    registry = GenerationRegistry(ttl_ms=60_000)
    engine = Engine(registry, ModelSet(catalog, _make), max_concurrent=1)
    engine.start()
    engine.load_model()
    config = ApiConfig(max_batch=2, poll_interval_ms=250, api_key=api_key)
    app = create_app(registry, engine, config, models=catalog)
    try:
        with TestClient(app, base_url="http://localhost") as client:
            yield client
    finally:
        engine.shutdown()


@pytest.fixture
def http(catalog: ModelCatalog) -> Iterator[TestClient]:
    yield from serve(catalog, None)


def test_the_listing_marks_the_loaded_and_the_default_and_shows_no_paths(
    http: TestClient,
) -> None:
    body = http.get("/v1/models").json()
    assert body == {
        "models": [
            {"id": "builtin", "architecture": "sd1", "format": "builtin", "loaded": True,
             "default": True},
            {"id": "alpha", "architecture": "sd1", "format": "diffusers", "loaded": False,
             "default": False},
        ]
    }  # fmt: skip
    job = http.post("/v1/images/generations", json={"prompt": "p", "steps": 2, "model": "alpha"})
    assert job.status_code == 201, job.text
    assert poll_until(http, job.json()["id"])[-1]["status"] == "complete"
    loaded = {entry["id"]: entry["loaded"] for entry in http.get("/v1/models").json()["models"]}
    assert loaded == {"builtin": False, "alpha": True}
    assert http.get("/health").json()["loadedModels"] == ["alpha"]


def test_an_unknown_model_is_refused_before_a_job_exists(http: TestClient) -> None:
    response = http.post("/v1/images/generations", json={"prompt": "p", "model": "nope"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["details"]["field"] == "model"
    assert "builtin, alpha" in error["message"]
    assert http.get("/v1/images/generations").json()["generations"] == []


def test_paths_only_with_the_api_key(catalog: ModelCatalog, tmp_path: Path) -> None:
    for client in serve(catalog, KEY):
        assert client.get("/v1/models").status_code == 401
        listed = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        paths = {entry["id"]: entry["path"] for entry in listed["models"]}
        assert paths == {"builtin": None, "alpha": str(tmp_path / "alpha")}


def test_a_plugin_backend_lists_its_one_model_and_takes_any_model() -> None:
    with in_process_api() as api:
        assert [m["format"] for m in api.client.get("/v1/models").json()["models"]] == ["plugin"]
        response = api.client.post("/v1/images/generations", json={"prompt": "p", "model": "x"})
        assert response.status_code == 201
