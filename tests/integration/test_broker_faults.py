"""The broker mode when Redis misbehaves, with real processes: a redis-server that is
stopped, paused or restarted under an API node and a worker (issue 14)."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from diffusiond.testing.deployment import RedisServer, start_api, start_redis, start_worker
from diffusiond.testing.harness import ServerProcess, launch, server_env
from diffusiond.testing.waits import eventually
from tests.support.server import poll_until

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


# Longer than redis-py's own reconnecting (3 retries, backoff up to 1 + 2 + 4 s), after which
# a subscription that does not reconnect by itself is gone for good. An outage is a length
# of time, not an event: this one is waited out.
OUTAGE_S = 10.0


def _restart_on_the_same_port(redis_server: RedisServer, tmp: Path) -> RedisServer:
    """Stop redis-server, and after OUTAGE_S start a fresh one (empty) on the same port."""
    redis_server.stop()
    time.sleep(OUTAGE_S)
    binary = shutil.which("redis-server")
    assert binary is not None
    command = [binary, "--port", str(redis_server.port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen(
        [*command, "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    restarted = RedisServer(process, redis_server.port)

    def answers() -> bool:
        assert process.poll() is None, "redis-server exited at start"
        try:
            with restarted.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    eventually(answers, timeout=20, interval=0.05, message="redis-server never came back")
    return restarted


def _submit_waiting(
    http: httpx.Client, wait_s: int, job: dict[str, object] = SMALL
) -> httpx.Response:
    """POST with `Prefer: wait`, again while the node says 503 (no worker seen yet)."""
    answers: list[httpx.Response] = []

    def admitted() -> bool:
        answers.append(
            http.post("/v1/images/generations", json=job, headers={"Prefer": f"wait={wait_s}"})
        )
        return answers[-1].status_code != 503

    eventually(admitted, timeout=60, interval=0.2, message=lambda: answers[-1].text)
    return answers[-1]


def test_notifications_resume_after_a_redis_restart(
    model_home: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = start_worker(model_home, redis_server.url)
    # No heartbeat on the stream for 10 min: only a notification can end it before that.
    api = start_api(model_home, redis_server.url, "--sse-heartbeat-ms", "600000")
    try:
        with api.client(timeout_s=60) as http:
            assert _submit_waiting(http, 60).json()["status"] == "complete"
            redis_server = _restart_on_the_same_port(redis_server, tmp_path)
            job = {"prompt": "after the restart", "width": 512, "height": 512, "steps": 40}
            job_id = _submit_waiting(http, 0, job).json()["id"]
            with http.stream("GET", f"/v1/images/generations/{job_id}/events") as stream:
                text = "".join(stream.iter_text())  # a read timeout (60 s) fails the test
            assert "event: complete" in text
    finally:
        _stop_all(api, worker, redis_server)
    assert api.text().count("broker notifications lost") == 1
    assert "broker notifications resumed" in api.text()


def _stop_all(api: ServerProcess, worker: ServerProcess, redis_server: RedisServer) -> None:
    api.stop()
    worker.stop()
    redis_server.stop()


def test_a_worker_stopped_past_its_grace_ends_its_job_and_never_requeues_it(
    model_home: Path, redis_server: RedisServer
) -> None:
    worker = start_worker(model_home, redis_server.url, "--grace-seconds", "1")
    api = start_api(model_home, redis_server.url)
    try:
        with api.client() as http:
            long_job = {"prompt": "long", "width": 512, "height": 512, "steps": 150}
            job_id = _submit_waiting(http, 0, long_job).json()["id"]
            poll_until(
                http,
                job_id,
                lambda body: (
                    body["status"] == "in_progress"
                    and (body.get("progress") or {}).get("currentStep", 0) >= 1
                ),
            )
            code = worker.stop(timeout_s=60)  # SIGTERM; the grace (1 s) runs out mid-job
            body = http.get(f"/v1/images/generations/{job_id}").json()
            assert body["status"] == "error", (code, body, worker.tail())
            assert body["error"]["code"] == "WORKER_LOST"
            assert "stopped" in body["error"]["message"]
            with redis_server.client() as client:
                assert client.llen("saq:diffusiond:queued") == 0
    finally:
        _stop_all(api, worker, redis_server)


def _redis_receive_queue(port: int) -> int:
    """Bytes sent to the redis-server at `port` that it has not read (Linux /proc/net/tcp)."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            waiting += int(fields[4].split(":")[1], 16)
    return waiting


def test_a_paused_redis_holds_only_the_requests_that_need_it(
    model_home: Path, redis_server: RedisServer
) -> None:
    # No periodic sweep: while Redis is paused, only the slow request writes to it.
    api = start_api(model_home, redis_server.url, "--broker-sweep-s", "3600")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        with api.client(timeout_s=60) as slow_http, api.client(timeout_s=60) as fast_http:
            assert fast_http.get("/openapi.json").status_code == 200  # connected, warm
            assert slow_http.get("/v1/images/generations/gen_1_x").status_code == 404
            unread = _redis_receive_queue(redis_server.port)
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:
                slow = pool.submit(slow_http.get, "/v1/images/generations/gen_1_x")
                # The slow request has reached Redis: its command waits, unread.
                eventually(
                    lambda: _redis_receive_queue(redis_server.port) > unread,
                    timeout=30,
                    message="the API node never sent the slow request's command to Redis",
                )
                fast = fast_http.get("/openapi.json")
                page = fast_http.get("/")
                assert not slow.done(), slow.result().text
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
            assert fast.status_code == 200
            assert page.status_code == 200
            assert slow.result(timeout=60).status_code in (404, 503)
    finally:
        pool.shutdown()
        api.stop()
