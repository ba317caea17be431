"""Jobs that survive: the sqlite store across restarts and kill -9, the bounded queue,
eviction by bytes, and graceful shutdown. Real server processes, built-in model."""

from __future__ import annotations

import base64
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.server import ServerProcess, poll_until, start_server, wait_first_step

LONG = {"prompt": "a very long job", "width": 2048, "height": 2048, "steps": 150, "seed": 1}
SMALL = {"prompt": "a small job", "width": 64, "height": 64, "steps": 2}


def submit(http: httpx.Client, body: dict[str, Any]) -> str:
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_exit(server: ServerProcess, timeout_s: float) -> int:
    try:
        return server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise AssertionError(f"still running after {timeout_s} s:\n{server.text()}") from None


def test_a_complete_job_is_fetchable_after_a_restart(model_home: Path, tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'jobs.db'}"
    first = start_server(model_home, "--store", store)
    try:
        with first.client() as http:
            job_id = submit(http, {**SMALL, "count": 2, "seed": 5})
            before = poll_until(http, job_id)[-1]
        assert before["status"] == "complete"
    finally:
        assert first.stop() == 0, first.text()

    second = start_server(model_home, "--store", store)
    try:
        with second.client() as http:
            after = http.get(f"/v1/images/generations/{job_id}")
            assert after.status_code == 200
            assert after.json() == before  # the same images, byte for byte, and timestamps
            listed = http.get("/v1/images/generations").json()["generations"]
            assert [job["id"] for job in listed] == [job_id]
    finally:
        assert second.stop() == 0, second.text()


def test_kill_9_mid_generation_then_restart(model_home: Path, tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'jobs.db'}"
    first = start_server(model_home, "--store", store, "--max-queue", "2")
    with first.client() as http:
        done_id = submit(http, SMALL)
        poll_until(http, done_id)
        running_id = submit(http, LONG)
        wait_first_step(http, running_id)
        queued_id = submit(http, {**SMALL, "seed": 9})
        assert http.get(f"/v1/images/generations/{queued_id}").json()["queuePosition"] == 1
    first.process.kill()  # SIGKILL: no chance to write anything more
    first.process.wait()

    second = start_server(model_home, "--store", store, "--max-queue", "2")
    try:
        with second.client() as http:
            interrupted = http.get(f"/v1/images/generations/{running_id}").json()
            assert interrupted["status"] == "error"
            assert interrupted["error"]["code"] == "SERVER_RESTARTED"
            assert "restarted" in interrupted["error"]["message"]
            assert "progress" not in interrupted
            queued = poll_until(http, queued_id)[-1]
            assert queued["status"] == "complete"
            assert queued["result"]["images"][0]["seed"] == 9
            listed = {
                job["id"]: job["status"]
                for job in http.get("/v1/images/generations").json()["generations"]
            }
            assert listed == {done_id: "complete", running_id: "error", queued_id: "complete"}
    finally:
        assert second.stop() == 0, second.text()


def test_queue_positions_order_and_full_queue(model_home: Path) -> None:
    server = start_server(model_home, env={"IMAGE_MAX_QUEUE": "3"})
    try:
        with server.client() as http:
            long_id = submit(http, LONG)
            wait_first_step(http, long_id)
            queued = [submit(http, {**SMALL, "seed": seed}) for seed in (1, 2, 3)]

            def positions() -> list[int | None]:
                bodies = [http.get(f"/v1/images/generations/{job_id}").json() for job_id in queued]
                assert all(body["status"] == "pending" for body in bodies)
                return [body.get("queuePosition") for body in bodies]

            assert positions() == [1, 2, 3]
            assert "queuePosition" not in http.get(f"/v1/images/generations/{long_id}").json()
            health = http.get("/health").json()
            assert (health["queueDepth"], health["maxQueue"]) == (3, 3)

            full = http.post("/v1/images/generations", json=SMALL)
            assert full.status_code == 503
            assert full.json()["error"]["code"] == "SERVER_BUSY"
            assert int(full.headers["retry-after"]) >= 1

            # A cancel from the middle of the queue moves the ones behind it up.
            assert http.delete(f"/v1/images/generations/{queued[1]}").status_code == 200
            first, _, last = queued
            queued = [first, last]
            assert positions() == [1, 2]
            refill = submit(http, {**SMALL, "seed": 4})  # the freed place takes a new job
            queued.append(refill)
            assert positions() == [1, 2, 3]

            assert http.delete(f"/v1/images/generations/{long_id}").status_code == 200
            finals = [poll_until(http, job_id)[-1] for job_id in queued]
            assert [body["status"] for body in finals] == ["complete"] * 3
            # One worker, arrival order: each finished before the next one did.
            finished = [body["updatedAt"] for body in finals]
            assert finished == sorted(finished)
            assert [body["result"]["images"][0]["seed"] for body in finals] == [1, 3, 4]
    finally:
        assert server.stop() == 0, server.text()


def test_results_over_the_byte_cap_evict_the_oldest(model_home: Path) -> None:
    cap = 40_000  # bytes of PNG; a 64x64 image of the built-in model is a few kB
    server = start_server(model_home, env={"IMAGE_MAX_RESULT_BYTES": str(cap)})
    try:
        with server.client() as http:
            sizes: dict[str, int] = {}
            order: list[str] = []
            for seed in range(8):
                job_id = submit(http, {**SMALL, "width": 96, "height": 96, "seed": seed})
                body = poll_until(http, job_id)[-1]
                assert body["status"] == "complete"
                sizes[job_id] = len(base64.b64decode(body["result"]["images"][0]["image"]))
                order.append(job_id)

            # Expected survivors: the newest results whose bytes fit (the newest always).
            kept: list[str] = []
            total = 0
            for job_id in reversed(order):
                if kept and total + sizes[job_id] > cap:
                    break
                kept.append(job_id)
                total += sizes[job_id]
            assert 1 <= len(kept) < len(order), (sizes, cap)  # the cap did evict something

            for job_id in order:
                status = http.get(f"/v1/images/generations/{job_id}").status_code
                assert status == (200 if job_id in kept else 404), (job_id, order, kept)
            listed = [job["id"] for job in http.get("/v1/images/generations").json()["generations"]]
            assert listed == kept
    finally:
        assert server.stop() == 0, server.text()


def test_sigterm_lets_a_short_job_finish_then_exits_0(model_home: Path, tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'jobs.db'}"
    server = start_server(model_home, "--store", store, "--grace-seconds", "60")
    with server.client() as http:
        job_id = submit(http, {**SMALL, "width": 512, "height": 512, "steps": 20})
        poll_until(http, job_id, lambda body: body["status"] == "in_progress")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_line("diffusiond: SIGTERM: shutting down")
    assert wait_exit(server, 60) == 0, server.text()

    again = start_server(model_home, "--store", store)
    try:
        with again.client() as http:
            assert http.get(f"/v1/images/generations/{job_id}").json()["status"] == "complete"
    finally:
        assert again.stop() == 0


def test_sigterm_past_the_grace_time_cancels_and_exits_0(model_home: Path, tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'jobs.db'}"
    server = start_server(model_home, "--store", store, "--grace-seconds", "2", "--max-queue", "1")
    with server.client() as http:
        running_id = submit(http, LONG)
        wait_first_step(http, running_id)
        queued_id = submit(http, SMALL)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_line("diffusiond: SIGTERM: shutting down")
        refused = http.post("/v1/images/generations", json=SMALL)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "SERVER_BUSY"
        assert "shutting down" in refused.json()["error"]["message"]
        assert http.get("/health").json()["draining"] is True
    signalled = time.monotonic()
    assert wait_exit(server, 30) == 0, server.text()
    # The grace time, then at most a step of the cancelled job (about a second here).
    assert time.monotonic() - signalled < 15

    again = start_server(model_home, "--store", store)
    try:
        with again.client() as http:
            assert http.get(f"/v1/images/generations/{running_id}").json()["status"] == "cancelled"
            # The job that waited in the queue was kept, and runs after the restart.
            assert poll_until(http, queued_id)[-1]["status"] == "complete"
    finally:
        assert again.stop() == 0


def test_a_second_signal_exits_at_once(model_home: Path) -> None:
    server = start_server(model_home, "--grace-seconds", "600")
    with server.client() as http:
        wait_first_step(http, submit(http, LONG))
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_line("diffusiond: SIGTERM: shutting down")
    server.process.send_signal(signal.SIGTERM)
    assert wait_exit(server, 10) == 128 + signal.SIGTERM
    assert "second signal" in server.text()
