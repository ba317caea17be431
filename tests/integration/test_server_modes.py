"""Servers started with other settings: TTL expiry, two workers, faults, loading, bad starts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from diffusiond.settings import Settings
from diffusiond.testing.waits import eventually
from tests.support.server import (
    REPO_ROOT,
    ServerProcess,
    launch,
    poll_until,
    server_env,
    start_server,
)

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def short_ttl_server(model_home: Path) -> Iterator[ServerProcess]:
    process = start_server(
        model_home,
        env={
            "IMAGE_RESULT_TTL_MS": "1000",
            "IMAGE_CLEANUP_INTERVAL_MS": "50",
            "IMAGE_MAX_CONCURRENT": "2",
        },
    )
    yield process
    assert process.stop() == 0, process.text()


def test_the_server_keeps_at_most_max_jobs_dropping_the_first_ended(model_home: Path) -> None:
    process = start_server(model_home, "--max-jobs", "3")
    try:
        with process.client() as client:
            ids = []
            for _ in range(6):
                answer = client.post("/v1/images/generations", json={"prompt": "x" * 5000})
                assert answer.status_code == 201, answer.text
                ids.append(answer.json()["id"])
                assert client.delete(f"/v1/images/generations/{ids[-1]}").status_code == 200
            kept = [job["id"] for job in client.get("/v1/images/generations").json()["generations"]]
            assert sorted(kept) == sorted(ids[-3:])
            assert client.get(f"/v1/images/generations/{ids[0]}").status_code == 404
    finally:
        assert process.stop() == 0, process.text()


def test_terminal_jobs_expire_after_ttl_but_running_ones_never(
    short_ttl_server: ServerProcess,
) -> None:
    with short_ttl_server.client() as client:
        job_id = client.post(
            "/v1/images/generations", json={"prompt": "x", "width": 512, "height": 512, "steps": 40}
        ).json()["id"]
        # The sweep runs every 50 ms with a TTL of 1 s, for the three seconds or so this job
        # runs: every poll until it ends must still find it.
        seen = poll_until(client, job_id, interval_s=0.01)
        assert len(seen) > 5
        assert seen[-1]["status"] == "complete"
        eventually(
            lambda: client.get(f"/v1/images/generations/{job_id}").status_code != 200,
            timeout=30,
            message="a terminal job outlived its TTL",
        )
        gone = client.get(f"/v1/images/generations/{job_id}")
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "NOT_FOUND"
        assert job_id not in client.get("/v1/images/generations").text


def test_two_workers_run_two_jobs_at_once_and_refuse_a_third(
    short_ttl_server: ServerProcess,
) -> None:
    long = {"prompt": "x", "width": 1024, "height": 1024, "steps": 150}
    with short_ttl_server.client() as client:
        ids = [client.post("/v1/images/generations", json=long).json()["id"] for _ in range(2)]
        for job_id in ids:
            poll_until(client, job_id, lambda body: body["status"] == "in_progress")
        health = client.get("/health").json()
        assert health["activeGenerations"] == 2
        assert health["maxConcurrent"] == 2
        third = client.post("/v1/images/generations", json=SMALL | {"prompt": "x"})
        assert third.status_code == 503
        assert third.json()["error"]["code"] == "SERVER_BUSY"
        for job_id in ids:
            assert client.delete(f"/v1/images/generations/{job_id}").status_code == 200


def test_a_failing_image_fails_the_batch_naming_it(faulty_server: ServerProcess) -> None:
    with faulty_server.client() as client:
        job_id = client.post(
            "/v1/images/generations",
            json={"prompt": "boom [fail-seed=101]", "seed": 100, "count": 3, **SMALL},
        ).json()["id"]
        seen = poll_until(client, job_id)
        final = seen[-1]
        assert final["status"] == "error"
        assert final["error"]["code"] == "BACKEND_ERROR"
        assert final["error"]["message"].startswith("Generation failed on image 2 of 3: ")
        assert "injected fault at seed 101" in final["error"]["message"]
        assert "result" not in final
        assert "Traceback" not in json.dumps(final)

        # The server keeps serving, and the next job works.
        healthy = client.post("/v1/images/generations", json={"prompt": "fine", **SMALL})
        assert poll_until(client, healthy.json()["id"])[-1]["status"] == "complete"


def test_out_of_memory_is_stored_as_out_of_memory(faulty_server: ServerProcess) -> None:
    with faulty_server.client() as client:
        job_id = client.post(
            "/v1/images/generations", json={"prompt": "big [oom-seed=5]", "seed": 5, **SMALL}
        ).json()["id"]
        final = poll_until(client, job_id)[-1]
        assert final["status"] == "error"
        assert final["error"]["code"] == "OUT_OF_MEMORY"
        assert final["error"]["message"].startswith("Generation failed: ")


def test_not_ready_while_the_model_loads(model_home: Path, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    process = start_server(
        model_home,
        "--backend",
        "tests.support.faulty_backend:create",
        env={"DIFFUSIOND_TEST_LOAD_GATE": str(gate)},
        wait_ready=False,
    )
    try:
        with process.client() as client:
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["error"]["code"] == "SERVER_NOT_READY"
            post = client.post("/v1/images/generations", json={"prompt": "x"})
            assert post.status_code == 503
            assert post.json()["error"]["code"] == "SERVER_NOT_READY"
            gate.touch()
            process.wait_for_line("diffusiond: ready")
            assert client.get("/health").status_code == 200
    finally:
        assert process.stop() == 0


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        env=server_env(env),
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGE_RESULT_TTL_MS", "abc"),
        ("IMAGE_RESULT_TTL_MS", "-5"),
        ("IMAGE_CLEANUP_INTERVAL_MS", "0"),
        ("IMAGE_MAX_CONCURRENT", "0"),
        ("IMAGE_MAX_BATCH", "1.5"),
        ("IMAGE_POLL_INTERVAL_MS", ""),
    ],
)
def test_malformed_environment_stops_the_server_naming_it(variable: str, value: str) -> None:
    finished = run_serve(env={variable: value})
    assert finished.returncode == 2
    assert variable in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_missing_model_path_stops_the_server_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    finished = run_serve("--model", str(missing))
    assert finished.returncode == 2
    assert str(missing) in finished.stderr
    assert "does not exist" in finished.stderr


def test_a_broken_model_folder_stops_the_server_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
            }
        )
    )
    process = launch(["--port", "0", "--model", str(broken)])
    assert process.process.wait(timeout=120) == 1
    assert str(broken) in process.text()
    assert "cannot start" in process.text()


def test_help_documents_every_flag_and_variable() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "diffusiond", "serve", "--help"],
        capture_output=True,
        text=True,
        env=server_env(),
        check=True,
    )
    for needle in (
        "--host",
        "--port",
        "--model",
        "--device",
        "IMAGE_RESULT_TTL_MS",
        "IMAGE_CLEANUP_INTERVAL_MS",
        "IMAGE_MAX_CONCURRENT",
        "IMAGE_MAX_BATCH",
        "IMAGE_POLL_INTERVAL_MS",
        "DIFFUSIOND_HOME",
    ):
        assert needle in finished.stdout


def test_http_client_sees_busy_false_after_a_fault(faulty_server: ServerProcess) -> None:
    with httpx.Client(base_url=faulty_server.url) as client:
        assert client.get("/health").json()["busy"] is False


def test_a_taken_port_stops_the_server_with_a_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = run_serve("--port", str(port))
    assert finished.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_the_http_thread_runs_below_the_generation_threads(
    server: ServerProcess, client: httpx.Client
) -> None:
    def nice(tid: str) -> int:
        stat = Path(f"/proc/{server.process.pid}/task/{tid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5)

    job = client.post("/v1/images/generations", json={"prompt": "x", **SMALL}).json()
    poll_until(client, job["id"])  # the worker has run torch: its threads exist
    tids = [entry.name for entry in Path(f"/proc/{server.process.pid}/task").iterdir()]
    main_thread = str(server.process.pid)  # the event loop runs on the main thread
    assert nice(main_thread) == Settings().http_niceness
    assert any(nice(tid) == 0 for tid in tids if tid != main_thread)
