"""`python -m diffusiond ...` in a subprocess: started, read line by line, stopped.

Tests and benchmarks start their servers (and workers) through here. The output (stdout
and stderr merged) is read on a thread as it comes, so the pipe never fills; every line
is kept for the failure message and for tests that check the logs.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import httpx

LISTENING_PREFIX = "diffusiond: listening on "
READY_LINE = "diffusiond: ready"


class ServerError(AssertionError):
    """The process did not print what was awaited in time, or exited first."""


class ServerProcess:
    """A running `diffusiond` process: its URL (once listening) and all it printed."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.url = ""
        self.startup_s = 0.0  # from start to ready, when started by `start_server`
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        with stdout:  # closed at the end of the output, or it leaks (a ResourceWarning)
            for line in stdout:
                self.output.append(line)
                self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, prefix: str, timeout_s: float = 120.0) -> str:
        """The next line that starts with `prefix`; ServerError if none comes in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ServerError(f"no {prefix!r} line in time; output:\n{self.tail()}") from None
            if line is None:
                code = self.process.poll()
                raise ServerError(f"exited (code {code}) before {prefix!r}:\n{self.tail()}")
            if line.startswith(prefix):
                return line

    def text(self) -> str:
        return "".join(self.output)

    def tail(self, chars: int = 6000) -> str:
        return self.text()[-chars:]

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait up to `timeout_s` (SIGKILL after that); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._pump_thread.join(timeout=5)  # the last lines are in `output` once stopped
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def server_env(
    extra: Mapping[str, str] | None = None,
    *,
    python_path: Iterable[Path | str] = (),
    inherit_settings: bool = False,
) -> dict[str, str]:
    """This process's environment, offline and unbuffered, for a diffusiond child.

    Unless `inherit_settings`, the caller's own IMAGE_* and DIFFUSIOND_* settings are left
    out, so that a child runs with exactly the settings asked of it. `python_path` goes
    first on PYTHONPATH (for plugin backends outside the package).
    """
    prefixes = () if inherit_settings else ("IMAGE_", "DIFFUSIOND_")
    env = {k: v for k, v in os.environ.items() if not (prefixes and k.startswith(prefixes))}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(path) for path in python_path]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def launch(
    args: Iterable[str],
    env: Mapping[str, str] | None = None,
    *,
    command: str = "serve",
    cwd: Path | None = None,
) -> ServerProcess:
    """Run `python -m diffusiond COMMAND ARGS` with `env` (see `server_env`) as it is."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusiond", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(env) if env is not None else server_env(),
        cwd=cwd,
    )
    return ServerProcess(process)


def start_server(
    args: Iterable[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    wait_ready: bool = True,
    listen_timeout_s: float = 120.0,
    ready_timeout_s: float = 300.0,
) -> ServerProcess:
    """`diffusiond serve --port 0 ARGS`, returned once listening (and, by default, ready:
    the model is loaded). A server that does not get there in time is stopped."""
    started = time.monotonic()
    server = launch(["--port", "0", *args], env, cwd=cwd)
    try:
        listening = server.wait_for_line(LISTENING_PREFIX, listen_timeout_s)
        server.url = listening.strip().rsplit(" ", 1)[-1]
        if wait_ready:
            server.wait_for_line(READY_LINE, ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.monotonic() - started
    return server
