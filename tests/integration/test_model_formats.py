"""The real server on a single-file checkpoint, and a bad --dtype or model file at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.model_files import tiny_model_files
from tests.support.server import REPO_ROOT, launch, poll_until, server_env, start_server


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


def test_a_single_file_checkpoint_serves_and_health_names_it(model_home: Path) -> None:
    folder, single_file = tiny_model_files(model_home)
    server = start_server(
        model_home,
        "--model",
        str(single_file),
        "--model-config",
        str(folder),
        "--dtype",
        "bfloat16",
    )
    try:
        with server.client() as client:
            health = client.get("/health").json()
            assert health["model"] == str(single_file)
            assert health["architecture"] == "sd1"
            assert health["dtype"] == "bfloat16"
            body = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3}
            job = client.post("/v1/images/generations", json=body).json()
            assert poll_until(client, job["id"])[-1]["status"] == "complete"
    finally:
        assert server.stop() == 0, server.text()


@pytest.mark.parametrize(("flag", "value"), [("--dtype", "fp8"), ("--dtype", "")])
def test_a_bad_dtype_stops_the_server_naming_the_flag(flag: str, value: str) -> None:
    finished = run_serve(flag, value)
    assert finished.returncode == 2
    assert flag in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_bad_dtype_variable_stops_the_server_naming_it() -> None:
    finished = run_serve(env={"DIFFUSIOND_DTYPE": "double"})
    assert finished.returncode == 2
    assert "DIFFUSIOND_DTYPE" in finished.stderr


def test_a_corrupt_checkpoint_stops_the_server_naming_it(tmp_path: Path) -> None:
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    process = launch(["--port", "0", "--home", str(tmp_path), "--model", str(corrupt)])
    assert process.process.wait(timeout=120) == 1
    assert str(corrupt) in process.text()
    assert "corrupt" in process.text()
