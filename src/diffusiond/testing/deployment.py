"""A broker deployment for tests and benchmarks: a private redis-server, workers, API nodes."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from diffusiond.testing.harness import ServerProcess, launch, server_env, start_server
from diffusiond.testing.requests import LONG_PIXELS
from diffusiond.testing.waits import eventually

if TYPE_CHECKING:  # the redis client is the broker extra's: imported where it is used
    import redis

# Short enough that a killed worker's job ends within seconds, long enough for a loaded CPU.
TEST_BROKER_ENV = {"DIFFUSIOND_BROKER_HEARTBEAT_S": "3", "DIFFUSIOND_BROKER_SWEEP_S": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_redis(tmp: Path) -> RedisServer:
    """redis-server on a free loopback port, without persistence; ready when it answers PING."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(process, port)
    import redis

    def answers() -> bool:
        assert process.poll() is None, "redis-server exited at start"
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    with server.client() as client:
        eventually(answers, timeout=20, interval=0.05, message="redis-server never answered PING")
    return server


def start_worker(
    home: Path, broker: str, *extra: str, env: Mapping[str, str] | None = None
) -> ServerProcess:
    worker = launch(
        ["--broker", broker, "--home", str(home), "--torch-threads", "1", *extra],
        server_env({**TEST_BROKER_ENV, **(env or {})}),
        command="worker",
    )
    worker.wait_for_line("diffusiond: worker ready")
    return worker


def start_api(home: Path, broker: str, *extra: str) -> ServerProcess:
    env = {"IMAGE_MAX_PIXELS": str(LONG_PIXELS), **TEST_BROKER_ENV}
    return start_server(["--home", str(home), "--broker", broker, *extra], server_env(env))


def deploy(
    home: Path, tmp: Path, *, workers: int, apis: int, api_args: tuple[str, ...] = ()
) -> Deployment:
    deployment = Deployment(start_redis(tmp))
    try:
        for _ in range(workers):
            deployment.workers.append(start_worker(home, deployment.redis.url))
        for _ in range(apis):
            deployment.apis.append(start_api(home, deployment.redis.url, *api_args))
    except BaseException:
        deployment.stop()
        raise
    return deployment


@dataclass
class Deployment:
    """Redis, workers and API nodes; stopped in reverse order."""

    redis: RedisServer
    workers: list[ServerProcess] = field(default_factory=list)
    apis: list[ServerProcess] = field(default_factory=list)

    def stop(self) -> list[str]:
        """Stop everything; the output of any process that did not exit cleanly."""
        failures = []
        for process in [*self.apis, *self.workers]:
            code = process.stop()
            if code not in (0, -9):
                failures.append(f"exit {code}:\n{process.text()}")
        self.redis.stop()
        return failures
