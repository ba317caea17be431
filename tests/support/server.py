"""The real `diffusiond serve` in a subprocess, as the tests start it.

The process wrapper lives in diffusiond.testing.harness (bench/ uses it too); this adds the
tests' defaults: the repository on PYTHONPATH (for the plugin backends under
tests/support), the repository as working directory, and room for LONG's pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from diffusiond.testing import harness
from diffusiond.testing.harness import ServerProcess
from diffusiond.testing.requests import (
    LONG_PIXELS,
    TERMINAL,
    poll_until,
    wait_first_step,
    wait_idle,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO_ROOT",
    "TERMINAL",
    "ServerProcess",
    "launch",
    "poll_until",
    "server_env",
    "start_server",
    "wait_first_step",
    "wait_idle",
]


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return harness.server_env(extra, python_path=[REPO_ROOT])


def launch(
    args: list[str], env: Mapping[str, str] | None = None, command: str = "serve"
) -> ServerProcess:
    """Run `python -m diffusiond COMMAND ARGS` with stdout and stderr merged and collected."""
    return harness.launch(args, server_env(env), command=command, cwd=REPO_ROOT)


def start_server(
    home: Path, *extra_args: str, env: Mapping[str, str] | None = None, wait_ready: bool = True
) -> ServerProcess:
    env = {"IMAGE_MAX_PIXELS": str(LONG_PIXELS), **(env or {})}
    return harness.start_server(
        ["--home", str(home), *extra_args], server_env(env), cwd=REPO_ROOT, wait_ready=wait_ready
    )
