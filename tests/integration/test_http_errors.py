"""Validation and the error envelope over real HTTP, on every kind of bad request."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

BAD_BODIES: list[tuple[Any, str]] = [
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 10_001}, "prompt"),
    ({"prompt": "x", "negativePrompt": "y" * 10_001}, "negativePrompt"),
    ({"prompt": "x", "negativePrompt": 3}, "negativePrompt"),
    ({"prompt": "x", "width": 63}, "width"),
    ({"prompt": "x", "width": 2056}, "width"),
    ({"prompt": "x", "width": 100}, "width"),
    ({"prompt": "x", "width": True}, "width"),
    ({"prompt": "x", "width": "512"}, "width"),
    ({"prompt": "x", "height": 512.0}, "height"),
    ({"prompt": "x", "steps": "20"}, "steps"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 151}, "steps"),
    ({"prompt": "x", "cfgScale": -0.5}, "cfgScale"),
    ({"prompt": "x", "cfgScale": 30.5}, "cfgScale"),
    ({"prompt": "x", "cfgScale": "7"}, "cfgScale"),
    ({"prompt": "x", "seed": 4294967296}, "seed"),
    ({"prompt": "x", "seed": -2}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "sampler": "plms"}, "sampler"),
    ({"prompt": "x", "sampler": 1}, "sampler"),
    ({"prompt": "x", "count": 0}, "count"),
    ({"prompt": "x", "count": 6}, "count"),
    ({"prompt": "x", "count": 2.0}, "count"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_fields_are_400_naming_the_field(client: httpx.Client, body: Any, field: str) -> None:
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert field in error["message"]
    assert error["details"]["field"] == field
    assert error["details"]["rule"]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'"a prompt"', b"", b"null", b'{"prompt": NaN}'],
)
def test_bodies_that_are_not_json_objects_are_400(client: httpx.Client, raw: bytes) -> None:
    response = client.post(
        "/v1/images/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


def test_an_oversized_body_is_413(client: httpx.Client) -> None:
    # The limit of this POST is DIFFUSIOND_MAX_BODY_BYTES (24 MiB: images travel in it).
    limit = 24 * 1024 * 1024
    response = client.post("/v1/images/generations", content=b"{" + b" " * limit + b"}")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert str(limit) in response.json()["error"]["message"]
    # a body past the old 64 KiB is read and judged on its content
    response = client.post("/v1/images/generations", content=b"{" + b" " * 70_000 + b"}")
    assert response.status_code == 400


def test_unknown_route_and_wrong_method_use_the_envelope(client: httpx.Client) -> None:
    missing = client.get("/v2/images")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "ROUTE_NOT_FOUND"

    wrong = client.put("/v1/images/generations")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert {"GET", "POST"} <= set(wrong.headers["allow"].replace(" ", "").split(","))

    wrong_item = client.post("/v1/images/generations/gen_1_abc")
    assert wrong_item.status_code == 405
    assert wrong_item.json()["error"]["code"] == "METHOD_NOT_ALLOWED"

    health = client.delete("/health")
    assert health.status_code == 405
    assert health.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_errors_never_carry_a_trace(client: httpx.Client) -> None:
    response = client.post("/v1/images/generations", content=b"\xff\xfe")
    assert response.status_code == 400
    assert "Traceback" not in response.text
    assert set(response.json()) == {"error"}
