"""The broker mode when Redis misbehaves, with real processes: a redis-server that is
stopped, paused or restarted under an API node and a worker (issue 14)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from diffusiond.testing.deployment import (
    RedisServer,
    start_api,
    start_redis,
)
from diffusiond.testing.harness import launch, server_env

PASSWORD = "Pa55-w0rd-never-shown"
API_KEY = "test-key-0123456789"
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path)
    yield server
    server.stop()


def test_no_response_or_log_line_carries_the_redis_password(
    model_home: Path, redis_server: RedisServer
) -> None:
    with redis_server.client() as admin:
        admin.config_set("requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    api = start_api(model_home, url, "--api-key", API_KEY, "--log-level", "debug")
    try:
        redis_server.stop()  # Redis is gone: every call the node makes fails
        keyed = {"Authorization": f"Bearer {API_KEY}"}
        with api.client(timeout_s=60) as http:
            responses = [
                http.get("/health"),
                http.get("/health", headers=keyed),
                http.post("/v1/images/generations", json=SMALL),
                http.post("/v1/images/generations", json=SMALL, headers=keyed),
                http.get("/v1/images/generations", headers=keyed),
                http.get("/v1/images/generations/gen_1_x", headers=keyed),
                http.get("/v1/images/generations/gen_1_x/events", headers=keyed),
                http.delete("/v1/images/generations/gen_1_x", headers=keyed),
            ]
        unreachable = [r for r in responses if r.status_code == 503]
        assert len(unreachable) >= 6, [(r.status_code, r.text) for r in responses]
        assert "is unreachable" in unreachable[0].json()["error"]["message"]
        assert "redis://:***@127.0.0.1" in unreachable[0].json()["error"]["message"]
        for response in responses:
            assert PASSWORD not in response.text
            assert PASSWORD not in str(response.headers)
        # Started while Redis is down: a worker and another API node refuse to start.
        refused = [
            launch(["--broker", url, "--home", str(model_home)], server_env(), command="worker"),
            launch(["--port", "0", "--broker", url, "--home", str(model_home)], server_env()),
            launch(["--port", "0", "--broker", f"http://:{PASSWORD}@h/0"], server_env()),
        ]
        for process in refused:
            assert process.process.wait(timeout=120) == 2, process.text()
            process.stop()
            assert "cannot start" in process.text()
            assert PASSWORD not in process.text(), process.text()
    finally:
        api.stop()
    assert "broker" in api.text()
    assert PASSWORD not in api.text(), api.text()
