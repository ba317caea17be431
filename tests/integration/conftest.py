"""Real servers over real HTTP with the built-in model, shared where tests allow it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.broker import deploy
from tests.support.server import ServerProcess, start_server, wait_idle

pytestmark = pytest.mark.integration

# The core HTTP contract: these modules run twice, against one process and against the
# broker mode (a redis-server, one `diffusiond worker`, one `diffusiond serve --broker`).
CONTRACT_MODULES = frozenset({"test_generation_flow", "test_cancel_and_busy", "test_http_errors"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in CONTRACT_MODULES and "deployment" in metafunc.fixturenames:
        metafunc.parametrize("deployment", ["single", "broker"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def deployment(request: pytest.FixtureRequest) -> str:
    """How the `server` fixture is deployed: "single" (one process) unless parametrized."""
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="session")
def model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session: the built-in model is built once, then loaded."""
    return tmp_path_factory.mktemp("diffusiond-home")


@pytest.fixture(scope="session")
def server(
    deployment: str, model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The default server: built-in model, one worker, default TTL; or, for the contract
    modules' second run, the same behind a broker (see CONTRACT_MODULES)."""
    if deployment == "broker":
        broker = deploy(model_home, tmp_path_factory.mktemp("redis"), workers=1, apis=1)
        yield broker.apis[0]
        assert broker.stop() == []
        return
    process = start_server(model_home)
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    """A client of the shared server, which is idle when the test starts."""
    with server.client() as http:
        wait_idle(http)
        yield http
        wait_idle(http)


@pytest.fixture(scope="session")
def faulty_server(model_home: Path) -> Iterator[ServerProcess]:
    """A server whose backend fails on request (see tests/support/faulty_backend.py)."""
    process = start_server(model_home, "--backend", "tests.support.faulty_backend:create")
    yield process
    assert process.stop() == 0, process.text()
