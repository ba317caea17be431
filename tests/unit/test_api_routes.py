"""Every route of the app in-process (TestClient) over the real Engine and registry with a
fake backend: answers, errors in the envelope, idempotency."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from diffusiond.api.app import MAX_BODY_BYTES
from diffusiond.testing.requests import GENERATIONS, SMALL, poll_until, submit
from tests.support.fakes import GatedBackend
from tests.support.inprocess import CONFIG, InProcessApi, in_process_api


@pytest.fixture
def api() -> Iterator[InProcessApi]:
    with in_process_api() as running:
        yield running


@pytest.fixture
def http(api: InProcessApi) -> TestClient:
    return api.client


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert "Traceback" not in response.text
    return error


def test_a_job_goes_from_post_to_get_to_its_png(http: TestClient) -> None:
    created = http.post(GENERATIONS, json={**SMALL, "seed": 5, "count": 2})
    assert created.status_code == 201
    job_id = created.json()["id"]
    assert set(created.json()) == {"id", "status", "createdAt"}
    assert created.headers["location"] == f"{GENERATIONS}/{job_id}"
    done = poll_until(http, job_id)[-1]
    assert done["status"] == "complete"
    assert [image["seed"] for image in done["result"]["images"]] == [5, 6]
    png = http.get(f"{GENERATIONS}/{job_id}/images/1")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert f'filename="{job_id}-1-seed6.png"' in png.headers["content-disposition"]
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    error_of(http.get(f"{GENERATIONS}/{job_id}/images/2"), 404, "NOT_FOUND")
    error_of(http.get(f"{GENERATIONS}/{job_id}/images/x"), 404, "NOT_FOUND")


def test_list_filters_by_status_and_limit(http: TestClient) -> None:
    ids = [submit(http, SMALL) for _ in range(3)]
    for job_id in ids:
        poll_until(http, job_id)
    listed = http.get(GENERATIONS).json()["generations"]
    assert [entry["id"] for entry in listed] == ids[::-1]
    assert all("result" not in entry for entry in listed)
    limited = http.get(GENERATIONS, params={"limit": 1, "status": "complete"})
    assert [entry["id"] for entry in limited.json()["generations"]] == [ids[-1]]
    assert http.get(GENERATIONS, params={"status": "pending"}).json() == {"generations": []}
    error = error_of(http.get(GENERATIONS, params={"status": "done"}), 400, "INVALID_REQUEST")
    assert error["details"]["field"] == "status"


def test_delete_cancels_a_running_job_and_then_is_409() -> None:
    backend = GatedBackend()
    with in_process_api(backend) as api:
        job_id = submit(api.client, SMALL)
        cancelled = api.client.delete(f"{GENERATIONS}/{job_id}")
        assert cancelled.status_code == 200
        assert cancelled.json() == {"id": job_id, "status": "cancelled"}
        backend.open()
        assert poll_until(api.client, job_id)[-1]["status"] == "cancelled"
        done = submit(api.client, SMALL)
        poll_until(api.client, done)
        error_of(api.client.delete(f"{GENERATIONS}/{done}"), 409, "ALREADY_TERMINAL")


def test_a_waiting_job_shows_its_queue_position() -> None:
    backend = GatedBackend()
    with in_process_api(backend) as api:
        first, second = submit(api.client, SMALL), submit(api.client, SMALL)
        waiting = api.client.get(f"{GENERATIONS}/{second}").json()
        assert waiting["status"] == "pending"
        assert waiting["queuePosition"] == 1
        health = api.client.get("/health").json()
        assert health["busy"] is True
        assert health["queueDepth"] == 1
        backend.open()
        for job_id in (first, second):
            assert poll_until(api.client, job_id)[-1]["status"] == "complete"


def test_health_openapi_and_the_web_page(http: TestClient) -> None:
    health = http.get("/health").json()
    assert health["status"] == "ok"
    assert (health["backend"], health["maxBatch"], health["pollIntervalMs"]) == ("fake", 4, 250)
    document = http.get("/openapi.json").json()
    assert f"{GENERATIONS}/{{id}}/events" in document["paths"]
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")


def test_unknown_routes_ids_and_wrong_methods_use_the_envelope(http: TestClient) -> None:
    error_of(http.get("/v1/nothing"), 404, "ROUTE_NOT_FOUND")
    for path in ("", "/events", "/images/0"):
        error_of(http.get(f"{GENERATIONS}/gen_0_unknown{path}"), 404, "NOT_FOUND")
    error_of(http.delete(f"{GENERATIONS}/gen_0_unknown"), 404, "NOT_FOUND")
    wrong = http.put(GENERATIONS, json=SMALL)
    error = error_of(wrong, 405, "METHOD_NOT_ALLOWED")
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert "GET" in error["suggestion"]
    error_of(http.post("/health"), 405, "METHOD_NOT_ALLOWED")


def test_an_oversized_body_is_413() -> None:
    config = dataclasses.replace(CONFIG, max_body_bytes=MAX_BODY_BYTES)
    with in_process_api(config=config) as small:
        prompt = "x" * (MAX_BODY_BYTES + 1)
        answer = small.client.post(GENERATIONS, json={"prompt": prompt})
        error = error_of(answer, 413, "PAYLOAD_TOO_LARGE")
        assert str(MAX_BODY_BYTES) in error["message"]


def test_the_generation_body_limit_is_its_own_setting(http: TestClient) -> None:
    # the default limit takes a body far over 64 KiB (images travel in it) ...
    prompt = "x" * (MAX_BODY_BYTES + 1)
    error_of(http.post(GENERATIONS, json={"prompt": prompt}), 400, "INVALID_REQUEST")
    # ... and a Content-Length over it is refused before the body is read
    answer = http.post(
        GENERATIONS,
        content=b"{}",
        headers={"content-length": str(CONFIG.max_body_bytes + 1)},
    )
    error_of(answer, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("body", "field", "rule_part"),
    [
        ({"prompt": ""}, "prompt", ""),
        ({**SMALL, "width": 63}, "width", "multiple of 8"),
        ({**SMALL, "steps": 0}, "steps", ""),
        ({**SMALL, "count": 5}, "count", ""),
        ({**SMALL, "sampler": "nope"}, "sampler", ""),
        ({**SMALL, "seed": "one"}, "seed", ""),
    ],
)
def test_bad_fields_are_400_naming_the_field_and_rule(
    http: TestClient, body: dict[str, Any], field: str, rule_part: str
) -> None:
    error = error_of(http.post(GENERATIONS, json=body), 400, "INVALID_REQUEST")
    assert error["details"]["field"] == field
    assert rule_part in error["details"].get("rule", error["message"])


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b"\xff"])
def test_bodies_that_are_not_json_objects_are_400(http: TestClient, raw: bytes) -> None:
    response = http.post(GENERATIONS, content=raw, headers={"content-type": "application/json"})
    error_of(response, 400, "INVALID_REQUEST")


def test_idempotency_key_replays_conflicts_and_refuses_bad_keys(http: TestClient) -> None:
    key = {"Idempotency-Key": "order-1"}
    first = http.post(GENERATIONS, json=SMALL, headers=key)
    assert first.status_code == 201
    job_id = first.json()["id"]
    replay = http.post(GENERATIONS, json=SMALL, headers=key)
    assert replay.status_code == 200
    assert replay.json()["id"] == job_id
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["location"] == f"{GENERATIONS}/{job_id}"
    conflict = http.post(GENERATIONS, json={**SMALL, "steps": 3}, headers=key)
    assert error_of(conflict, 409, "IDEMPOTENCY_CONFLICT")["details"] == {"id": job_id}
    poll_until(http, job_id)
    assert [e["id"] for e in http.get(GENERATIONS).json()["generations"]] == [job_id]
    assert submit(http, SMALL) != job_id  # without a key the same body is new work
    for bad in (b"has space", b"x" * 256, "\u00e9".encode()):
        refused = http.post(GENERATIONS, json=SMALL, headers={b"Idempotency-Key": bad})
        error = error_of(refused, 400, "INVALID_REQUEST")
        assert error["details"]["field"] == "Idempotency-Key"
        assert "visible ASCII" in error["details"]["rule"]
