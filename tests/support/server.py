"""Start the real `diffusiond serve` in a subprocess and talk to it over HTTP."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"complete", "error", "cancelled"}


@dataclass
class ServerProcess:
    """A running server: its process, its URL and everything it printed."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    url: str = ""

    def wait_for_line(self, prefix: str, timeout_s: float = 120.0) -> str:
        """Block until the server prints a line starting with `prefix` (or fail)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {prefix!r} line; output so far:\n{self.text()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
            if line == "":  # end of output: the process has exited
                raise AssertionError(f"server exited before {prefix!r}:\n{self.text()}")

    def text(self) -> str:
        return "".join(self.output)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_", "DIFFUSIOND_"))}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # The plugin backends under tests/support must be importable by the server process.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def launch(
    args: list[str], env: Mapping[str, str] | None = None, command: str = "serve"
) -> ServerProcess:
    """Run `python -m diffusiond COMMAND ARGS` with stdout and stderr merged and collected."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusiond", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=server_env(env),
        cwd=REPO_ROOT,
    )
    server = ServerProcess(process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.output.append(line)
            server.lines.put(line)
        server.lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return server


def start_server(
    home: Path, *extra_args: str, env: Mapping[str, str] | None = None, wait_ready: bool = True
) -> ServerProcess:
    # The tests' long jobs draw 2048x2048 (about a second a step): allow that many pixels.
    env = {"IMAGE_MAX_PIXELS": str(2048 * 2048), **(env or {})}
    server = launch(["--port", "0", "--home", str(home), *extra_args], env)
    listening = server.wait_for_line("diffusiond: listening on ")
    server.url = listening.strip().rsplit(" ", 1)[-1]
    if wait_ready:
        server.wait_for_line("diffusiond: ready")
    return server


def poll_until(
    client: httpx.Client,
    job_id: str,
    done: Any = lambda body: body["status"] in TERMINAL,
    timeout_s: float = 120.0,
    interval_s: float = 0.02,
) -> list[dict[str, Any]]:
    """GET the job until `done(body)`; every body seen, in order (the last one satisfies it)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/v1/images/generations/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if done(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"job {job_id} never got there: {seen[-1]}"
        time.sleep(interval_s)  # the poll interval of a client, not a wait for an event


def wait_first_step(client: httpx.Client, job_id: str) -> None:
    """Poll until the job is diffusing and has finished at least one step."""
    poll_until(
        client,
        job_id,
        lambda body: (
            body["status"] == "in_progress"
            and body["progress"]["stage"] == "diffusion"
            and body["progress"]["currentStep"] >= 1
        ),
    )


def wait_idle(client: httpx.Client, timeout_s: float = 60.0) -> None:
    """Wait until /health says no generation runs (a cancelled one has stopped)."""
    deadline = time.monotonic() + timeout_s
    while client.get("/health").json()["busy"]:
        assert time.monotonic() < deadline, "the server stayed busy"
        time.sleep(0.02)
