"""Access control, CORS, limits, faults and structured logs on a locked-down real server."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import ServerProcess, launch, poll_until, start_server, wait_idle

KEY = "test-key-0123456789abcdef"
ORIGIN = "http://localhost:5173"
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def locked(model_home: Path) -> Iterator[ServerProcess]:
    """Key, CORS, JSON logs, a 5 s job timeout, the default pixel budget, injectable faults."""
    process = start_server(
        model_home,
        "--backend",
        "tests.support.faulty_backend:create",
        "--log-json",
        env={
            "IMAGE_API_KEY": KEY,
            "IMAGE_CORS_ORIGINS": ORIGIN,
            "IMAGE_GENERATION_TIMEOUT_MS": "5000",
            "IMAGE_MAX_PIXELS": str(1024 * 1024),
        },
    )
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture
def authed(locked: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=locked.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    ) as client:
        wait_idle(client)
        yield client
        wait_idle(client)


def run_job(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/images/generations", json={"prompt": "x", **fields})
    assert response.status_code == 201, response.text
    return poll_until(client, response.json()["id"])[-1]


def test_every_endpoint_but_health_needs_the_key(locked: ServerProcess) -> None:
    calls = [
        ("GET", "/v1/images/generations"),
        ("POST", "/v1/images/generations"),
        ("GET", "/v1/images/generations/gen_1_x"),
        ("DELETE", "/v1/images/generations/gen_1_x"),
        ("GET", "/v1/images/generations/gen_1_x/events"),
        ("GET", "/v1/images/generations/gen_1_x/images/0"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
        ("HEAD", "/v1/images/generations"),
        ("HEAD", "/v1/images/generations/gen_1_x"),
        ("HEAD", "/v1/images/generations/gen_1_x/images/0"),
        ("HEAD", "/openapi.json"),
    ]
    with httpx.Client(base_url=locked.url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.head("/health").status_code == 200
        # Without the key, /health says nothing of the model's path or the machine.
        assert set(anonymous.get("/health").json()) == {
            "status",
            "busy",
            "pollIntervalMs",
            "maxBatch",
            "version",
        }
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-0123456789"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
        ):
            for method, path in calls:
                body = {"prompt": "x"} if method == "POST" else None
                response = anonymous.request(method, path, headers=headers, json=body)
                assert response.status_code == 401, (method, path, headers)
                if method != "HEAD":  # a HEAD answer has no body to read
                    assert response.json()["error"]["code"] == "UNAUTHORIZED"
                assert response.headers["www-authenticate"].startswith("Bearer")
    with httpx.Client(base_url=locked.url, headers={"Authorization": f"Bearer {KEY}"}) as ok:
        assert ok.get("/v1/images/generations").status_code == 200
        assert ok.get("/openapi.json").json()["security"] == [{"bearer": []}]
        assert "model" in ok.get("/health").json()


def test_cors_lets_the_configured_origin_poll(authed: httpx.Client) -> None:
    preflight = authed.options(
        "/v1/images/generations",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    created = authed.post(
        "/v1/images/generations", json={"prompt": "x", **SMALL}, headers={"Origin": ORIGIN}
    )
    assert created.headers["access-control-allow-origin"] == ORIGIN
    assert "location" in created.headers["access-control-expose-headers"].lower()
    poll_until(authed, created.json()["id"])

    stranger = authed.get("/v1/images/generations", headers={"Origin": "http://evil.test"})
    assert stranger.status_code == 403
    assert stranger.json()["error"]["code"] == "FORBIDDEN_ORIGIN"
    assert "access-control-allow-origin" not in stranger.headers
    refused = authed.options(
        "/v1/images/generations",
        headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in refused.headers


def test_cors_is_off_by_default(server: ServerProcess, client: httpx.Client) -> None:
    response = client.get("/v1/images/generations", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_the_pixel_budget_is_a_400_naming_both_sides(authed: httpx.Client) -> None:
    response = authed.post(
        "/v1/images/generations", json={"prompt": "x", "width": 2048, "height": 1024}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert "width x height" in error["message"]
    assert "1048576" in error["message"]
    assert (
        authed.post(
            "/v1/images/generations",
            json={"prompt": "x", "width": 1024, "height": 1024, "steps": 1},
        ).status_code
        == 201
    )


def test_a_declared_oversized_body_is_refused_before_it_is_sent(locked: ServerProcess) -> None:
    host, port = locked.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{"
        )
        answer = http.client.HTTPResponse(raw)  # read with 99.99 MB still unsent
        answer.begin()
        body = json.loads(answer.read())
    assert answer.status == 413
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_a_job_past_its_time_limit_ends_as_timeout_and_frees_the_worker(
    authed: httpx.Client,
) -> None:
    final = run_job(authed, width=1024, height=1024, steps=150)
    assert final["status"] == "error"
    assert final["error"]["code"] == "TIMEOUT_ERROR"
    assert "timed out after 5000 ms" in final["error"]["message"]
    assert run_job(authed, **SMALL)["status"] == "complete"


@pytest.mark.parametrize(
    ("fault", "code", "words"),
    [
        ("blank", "BACKEND_ERROR", "blank image"),
        ("oom", "OUT_OF_MEMORY", "out of memory"),
        ("fail", "BACKEND_ERROR", "injected fault"),
        ("path", "IO_ERROR", "<path>"),
        ("die", "UNKNOWN_ERROR", "internal error"),
    ],
)
def test_faults_end_the_job_with_their_code_and_the_next_job_works(
    authed: httpx.Client, fault: str, code: str, words: str
) -> None:
    final = run_job(authed, prompt=f"x [{fault}-seed=4]", seed=3, count=2, **SMALL)
    assert final["status"] == "error"
    assert final["error"]["code"] == code
    assert words in final["error"]["message"]
    assert "result" not in final
    text = json.dumps(final)
    assert "Traceback" not in text
    assert "/srv/secret" not in text
    assert run_job(authed, seed=11, **SMALL)["status"] == "complete"


def test_one_json_log_line_per_transition(locked: ServerProcess, authed: httpx.Client) -> None:
    done = run_job(authed, **SMALL)
    failed = run_job(authed, prompt="x [fail-seed=2]", seed=2, **SMALL)

    def transitions(job_id: str) -> list[dict[str, Any]]:
        entries = []
        for line in locked.output:
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("job") == job_id:
                    entries.append(entry)
        return entries

    ok = transitions(done["id"])
    assert [entry["status"] for entry in ok] == ["pending", "in_progress", "complete"]
    assert all(isinstance(entry["durationMs"], int) for entry in ok)
    assert ok[-1]["errorCode"] is None
    bad = transitions(failed["id"])
    assert [entry["status"] for entry in bad] == ["pending", "in_progress", "error"]
    assert bad[-1]["errorCode"] == "BACKEND_ERROR"
    assert all(entry["level"] == "info" for entry in bad)


def test_listening_beyond_loopback_needs_a_key_or_insecure(model_home: Path) -> None:
    refused = launch(["--host", "0.0.0.0", "--port", "0", "--home", str(model_home)])
    assert refused.process.wait(timeout=60) == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in refused.text()
    assert "--insecure" in refused.text()

    allowed = launch(["--host", "0.0.0.0", "--port", "0", "--home", str(model_home), "--insecure"])
    try:
        assert "listening on http://0.0.0.0:" in allowed.wait_for_line("diffusiond: listening")
    finally:
        allowed.stop()

    keyed = launch(
        ["--host", "0.0.0.0", "--port", "0", "--home", str(model_home)], {"IMAGE_API_KEY": KEY}
    )
    try:
        keyed.wait_for_line("diffusiond: listening")
    finally:
        keyed.stop()


def test_a_short_api_key_is_refused_at_start(model_home: Path) -> None:
    process = launch(["--port", "0", "--home", str(model_home)], {"IMAGE_API_KEY": "short"})
    assert process.process.wait(timeout=60) == 2
    assert "IMAGE_API_KEY" in process.text()
    assert "short" not in process.text().replace("IMAGE_API_KEY", "")


def test_the_client_sends_its_key(locked: ServerProcess, authed: httpx.Client) -> None:
    from diffusiond.client import Client, DiffusiondClientError

    with Client(locked.url, api_key=KEY) as sdk:
        assert [image.seed for image in sdk.generate("x", seed=1, **SMALL)] == [1]
    with Client(locked.url) as anonymous, pytest.raises(DiffusiondClientError) as caught:
        anonymous.list()
    assert caught.value.code == "UNAUTHORIZED"


def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send `request` as it is (no client tidies its path or headers); status and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(request)
        answer = http.client.HTTPResponse(raw)
        answer.begin()
        return answer.status, answer.read()


def test_a_page_on_another_origin_cannot_use_the_default_server(server: ServerProcess) -> None:
    host = server.url.removeprefix("http://")
    form = b'{"prompt": "x", "width": 64, "height": 64, "steps": 1}'
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # A cross-site fetch with a "simple" body needs no preflight: the Origin stops it.
        csrf = http.post(
            "/v1/images/generations",
            content=form,
            headers={"Content-Type": "text/plain", "Origin": "http://evil.test"},
        )
        assert csrf.status_code == 403
        assert csrf.json()["error"]["code"] == "FORBIDDEN_ORIGIN"
        # DNS rebinding: evil.test now resolves to 127.0.0.1, the browser sends its name.
        rebound = http.get(
            "/v1/images/generations", headers={"Host": f"evil.test:{host.split(':')[1]}"}
        )
        assert rebound.status_code == 403
        assert rebound.json()["error"]["code"] == "FORBIDDEN_HOST"
        # curl -d: a form content type and no Origin still works, as the README's curl does.
        curl = http.post(
            "/v1/images/generations",
            content=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert curl.status_code == 201, curl.text
        poll_until(http, curl.json()["id"])
        page = http.get("/", headers={"Host": f"localhost:{host.split(':')[1]}"})
        assert page.status_code == 200


def test_no_file_outside_static_is_served_to_a_raw_path(server: ServerProcess) -> None:
    host = server.url.removeprefix("http://")
    for path in ("/ui/../__init__.py", "/ui/%2e%2e/__init__.py", "/ui/..%2f..%2fapi/app.py"):
        status, body = raw_request(
            server.url, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 404, (path, body[:200])
        assert b"import" not in body, path


def test_the_open_prefix_is_no_way_around_the_key_on_the_wire(locked: ServerProcess) -> None:
    host = locked.url.removeprefix("http://")
    for path in ("/ui/../v1/images/generations", "/ui/%2e%2e/openapi.json"):
        status, body = raw_request(
            locked.url, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 401, (path, body[:200])
