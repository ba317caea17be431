"""Admission (503 while busy), cancel of running and pending jobs, 404 and 409."""

from __future__ import annotations

import time

import httpx

from tests.support.server import poll_until, wait_first_step, wait_idle

# One diffusion step of this job takes about a second on two CPU cores; all of it minutes.
LONG = {"prompt": "a very long job", "width": 2048, "height": 2048, "steps": 150, "seed": 1}


def start_long_and_wait_for_first_step(client: httpx.Client) -> str:
    response = client.post("/v1/images/generations", json=LONG)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    wait_first_step(client, job_id)
    return job_id


def test_busy_server_answers_503_with_retry_after(client: httpx.Client) -> None:
    long_id = start_long_and_wait_for_first_step(client)
    try:
        response = client.post("/v1/images/generations", json={"prompt": "another"})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "SERVER_BUSY"
        assert error["suggestion"]
        assert int(response.headers["retry-after"]) >= 1
        assert client.get("/health").json()["busy"] is True
    finally:
        assert client.delete(f"/v1/images/generations/{long_id}").status_code == 200


def seconds_per_step(client: httpx.Client, job_id: str) -> tuple[float, dict[str, int]]:
    """The job's own pace: the time between two sightings of its step changing (polled
    every 20 ms, so within a few percent of one step); and its progress at the second."""

    def next_step() -> dict[str, int]:
        now = client.get(f"/v1/images/generations/{job_id}").json()["progress"]["currentStep"]
        bodies = poll_until(
            client, job_id, lambda body: (body.get("progress") or {}).get("currentStep", 0) > now
        )
        progress: dict[str, int] = bodies[-1]["progress"]
        return progress

    next_step()
    seen_at = time.monotonic()
    progress = next_step()
    return time.monotonic() - seen_at, progress


def test_cancel_running_then_pending_job_frees_the_worker(client: httpx.Client) -> None:
    running_id = start_long_and_wait_for_first_step(client)
    step_s, before = seconds_per_step(client, running_id)

    cancelled_at = time.monotonic()
    response = client.delete(f"/v1/images/generations/{running_id}")
    assert response.status_code == 200
    assert response.json() == {"id": running_id, "status": "cancelled"}

    # The slot is free at once: a new job is admitted while the old one ends its step...
    pending = client.post(
        "/v1/images/generations", json={"prompt": "next", "width": 64, "height": 64, "steps": 2}
    )
    assert pending.status_code == 201, pending.text
    pending_id = pending.json()["id"]
    # ...and waits, pending, for the worker, which is still inside that step.
    assert client.get(f"/v1/images/generations/{pending_id}").json()["status"] == "pending"
    cancelled = client.delete(f"/v1/images/generations/{pending_id}")
    assert cancelled.status_code == 200
    assert cancelled.json() == {"id": pending_id, "status": "cancelled"}

    # The running generation stops at its next step: the worker goes idle long before the
    # ~150 s the job would have taken, and neither job ever changes again.
    wait_idle(client, timeout_s=30)
    stopped_after_s = time.monotonic() - cancelled_at
    for job_id in (running_id, pending_id):
        body = client.get(f"/v1/images/generations/{job_id}").json()
        assert body["status"] == "cancelled"
        assert "result" not in body
        assert "progress" not in body
    # At its own pace the job had minutes left; it stopped within a step or two of it.
    left_s = (before["totalSteps"] - before["currentStep"]) * step_s
    assert stopped_after_s < left_s / 10, (stopped_after_s, step_s, before)

    # The worker serves the next job normally.
    after = client.post(
        "/v1/images/generations", json={"prompt": "after", "width": 64, "height": 64, "steps": 2}
    )
    assert after.status_code == 201
    assert poll_until(client, after.json()["id"])[-1]["status"] == "complete"


def test_cancel_is_idempotent_and_409_once_complete(client: httpx.Client) -> None:
    running_id = start_long_and_wait_for_first_step(client)
    first = client.delete(f"/v1/images/generations/{running_id}")
    second = client.delete(f"/v1/images/generations/{running_id}")
    assert first.status_code == second.status_code == 200
    assert second.json() == {"id": running_id, "status": "cancelled"}
    wait_idle(client)

    done = client.post(
        "/v1/images/generations", json={"prompt": "x", "width": 64, "height": 64, "steps": 2}
    )
    done_id = done.json()["id"]
    assert poll_until(client, done_id)[-1]["status"] == "complete"
    conflict = client.delete(f"/v1/images/generations/{done_id}")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "ALREADY_TERMINAL"
    assert client.get(f"/v1/images/generations/{done_id}").json()["status"] == "complete"


def test_unknown_ids_are_404_not_found(client: httpx.Client) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(method, "/v1/images/generations/gen_0_doesnotexist")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "NOT_FOUND"
