"""The broker mode with real processes: redis-server, two workers, two API nodes.

Jobs are submitted to one API node and followed, cancelled and listed through the other;
a worker is killed mid-job. The core contract tests also run against this mode (one worker,
one API node): see CONTRACT_MODULES in tests/integration/conftest.py.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from diffusiond.testing.waits import eventually
from tests.support.broker import Deployment, deploy
from tests.support.server import TERMINAL, poll_until

SMALL = {"width": 64, "height": 64, "steps": 3}
LONG = {"prompt": "a very long job", "width": 2048, "height": 2048, "steps": 150, "seed": 1}
MEDIUM = {"prompt": "two at once", "width": 256, "height": 256, "steps": 40}


@pytest.fixture(scope="module")
def cluster(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = deploy(
        model_home,
        tmp_path_factory.mktemp("redis"),
        workers=2,
        apis=2,
        api_args=("--max-queue", "1"),
    )
    yield deployment
    failures = deployment.stop()
    assert failures == [], "\n".join(failures)


@pytest.fixture
def nodes(cluster: Deployment) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Clients of API node A and API node B; no job runs when a test starts or ends."""
    with cluster.apis[0].client() as a, cluster.apis[1].client() as b:
        wait_all_idle(cluster)
        yield a, b
        wait_all_idle(cluster)


def wait_all_idle(cluster: Deployment, timeout_s: float = 60) -> None:
    """Until no SAQ job is queued or active (a cancelled job's worker has finished it)."""
    records: list[dict[str, Any]] = []

    def idle() -> bool:
        records[:] = [json.loads(raw) for raw in map(redis.get, redis.keys("saq:job:*")) if raw]
        return not [r for r in records if r.get("status", "new") in {"new", "queued", "active"}]

    with cluster.redis.client() as redis:
        eventually(idle, timeout=timeout_s, interval=0.05, message=lambda: str(records))


def submit(client: httpx.Client, **fields: Any) -> str:
    response = client.post("/v1/images/generations", json={"prompt": "a lighthouse", **fields})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def saq_record(cluster: Deployment, job_id: str) -> dict[str, Any]:
    with cluster.redis.client() as redis:
        raw = redis.get(f"saq:job:diffusiond:{job_id}")
    assert raw is not None
    record: dict[str, Any] = json.loads(raw)
    return record


def running(client: httpx.Client, job_id: str) -> None:
    poll_until(
        client,
        job_id,
        lambda body: (
            body["status"] == "in_progress"
            and (body.get("progress") or {}).get("stage") == "diffusion"
            and (body.get("progress") or {}).get("currentStep", 0) >= 1
        ),
    )


def test_submitted_to_one_node_and_polled_to_completion_through_the_other(
    nodes: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = nodes
    job_id = submit(a, seed=11, count=2, width=128, height=128, steps=8)
    seen = poll_until(b, job_id, interval_s=0.01)
    final = seen[-1]
    assert final["status"] == "complete", final
    assert [image["seed"] for image in final["result"]["images"]] == [11, 12]
    for image in final["result"]["images"]:
        assert base64.b64decode(image["image"]).startswith(b"\x89PNG")
    running_states = [s for s in seen if s["status"] == "in_progress"]
    percentages = [s["progress"]["percentage"] for s in running_states]
    assert percentages == sorted(percentages)
    # The same job through node A, byte for byte; and the same seed again reproduces it.
    assert a.get(f"/v1/images/generations/{job_id}").json() == final
    again = poll_until(a, submit(b, seed=12, width=128, height=128, steps=8))[-1]
    assert again["result"]["images"][0]["image"] == final["result"]["images"][1]["image"]
    listed = [entry["id"] for entry in b.get("/v1/images/generations").json()["generations"]]
    assert job_id in listed


def test_two_jobs_run_at_once_on_the_two_workers(
    nodes: tuple[httpx.Client, httpx.Client], cluster: Deployment
) -> None:
    a, b = nodes
    first, second = submit(a, **MEDIUM), submit(b, **MEDIUM)
    states: list[str] = []

    def both_running() -> bool:
        states[:] = [
            a.get(f"/v1/images/generations/{job}").json()["status"] for job in (first, second)
        ]
        assert not set(states) & TERMINAL, f"one finished before the other started: {states}"
        return states == ["in_progress", "in_progress"]

    eventually(both_running, timeout=60, interval=0.01, message=lambda: str(states))
    health = b.get("/health").json()
    assert health["activeGenerations"] == 2
    assert health["busy"] is True
    for job in (first, second):
        assert poll_until(b, job)[-1]["status"] == "complete"
    workers = {saq_record(cluster, job)["worker_id"] for job in (first, second)}
    assert len(workers) == 2


def test_health_reports_the_workers_and_the_queue(
    nodes: tuple[httpx.Client, httpx.Client],
) -> None:
    for client in nodes:
        body = client.get("/health").json()
        assert body["status"] == "ok"
        assert body["mode"] == "broker"
        assert len(body["workers"]) == 2
        assert {w["model"] for w in body["workers"]} == {"diffusiond-builtin-v1"}
        assert body["maxConcurrent"] == 2
        assert body["queueDepth"] == 0
        assert body["model"] == "diffusiond-builtin-v1"


def test_full_queue_is_503_on_every_node_and_positions_are_shared(
    nodes: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = nodes
    long_ids = [submit(a, **LONG), submit(b, **LONG)]
    try:
        for job in long_ids:
            running(a, job)
        queued = submit(a, **SMALL)  # the one queue place (--max-queue 1)
        long_ids.append(queued)
        body = b.get(f"/v1/images/generations/{queued}").json()
        assert body["status"] == "pending"
        assert body["queuePosition"] == 1
        assert b.get("/health").json()["queueDepth"] == 1
        for client in (a, b):
            refused = client.post("/v1/images/generations", json={"prompt": "one more"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "SERVER_BUSY"
            assert int(refused.headers["retry-after"]) >= 1
    finally:
        for job in long_ids:
            assert b.delete(f"/v1/images/generations/{job}").status_code == 200


def test_cancel_through_the_other_node_stops_the_worker_within_steps(
    nodes: tuple[httpx.Client, httpx.Client], cluster: Deployment
) -> None:
    a, b = nodes
    job_id = submit(a, **LONG)
    running(a, job_id)
    cancelled_at = time.time()
    response = b.delete(f"/v1/images/generations/{job_id}")
    assert response.status_code == 200
    assert response.json() == {"id": job_id, "status": "cancelled"}
    assert b.delete(f"/v1/images/generations/{job_id}").status_code == 200  # idempotent
    # The worker stops at its next step (a 2048x2048 step takes seconds on one thread).
    eventually(
        lambda: saq_record(cluster, job_id).get("status") in {"complete", "aborted"},
        timeout=30,
        interval=0.05,
        message=lambda: str(saq_record(cluster, job_id)),
    )
    finished = saq_record(cluster, job_id)["completed"] / 1000
    assert finished - cancelled_at < 20
    for client in (a, b):
        body = client.get(f"/v1/images/generations/{job_id}").json()
        assert body["status"] == "cancelled"
        assert "result" not in body
    # Both workers serve the next jobs.
    after = [submit(b, **SMALL), submit(a, **SMALL)]
    for job in after:
        assert poll_until(a, job)[-1]["status"] == "complete"
    conflict = b.delete(f"/v1/images/generations/{after[0]}")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "ALREADY_TERMINAL"
    assert a.get("/v1/images/generations/gen_0_unknown").status_code == 404
    assert b.delete("/v1/images/generations/gen_0_unknown").status_code == 404


def test_prefer_wait_is_woken_across_processes(nodes: tuple[httpx.Client, httpx.Client]) -> None:
    a, b = nodes
    response = a.post(
        "/v1/images/generations",
        json={"prompt": "waited for", **SMALL},
        headers={"Prefer": "wait=30"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "complete"
    with b.stream("GET", f"/v1/images/generations/{response.json()['id']}/events") as stream:
        text = "".join(stream.iter_text())
    assert "event: complete" in text


def test_a_killed_worker_s_job_ends_worker_lost_and_the_other_worker_serves(
    nodes: tuple[httpx.Client, httpx.Client], cluster: Deployment
) -> None:
    """Last in this module: it leaves one worker."""
    a, b = nodes
    job_id = submit(a, **LONG)
    running(b, job_id)
    worker_id = saq_record(cluster, job_id)["worker_id"]
    pids = {w["id"]: w["pid"] for w in a.get("/health").json()["workers"]}
    victim = next(w for w in cluster.workers if w.process.pid == pids[worker_id])
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    # Heartbeat 3 s, sweep every 1 s: the job ends well within 30 s.
    final = poll_until(b, job_id, timeout_s=30, interval_s=0.1)[-1]
    assert final["status"] == "error", final
    assert final["error"]["code"] == "WORKER_LOST"
    assert "result" not in final
    next_job = submit(b, seed=3, **SMALL)
    assert poll_until(a, next_job)[-1]["status"] == "complete"
    assert a.delete(f"/v1/images/generations/{job_id}").status_code == 409
