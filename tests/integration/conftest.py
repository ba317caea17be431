"""Real servers over real HTTP with the built-in model, shared where tests allow it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.broker import deploy
from tests.support.server import ServerProcess, start_server, wait_idle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session: the built-in model is built once, then loaded."""
    return tmp_path_factory.mktemp("diffusiond-home")


@pytest.fixture(scope="session")
def server(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default server: built-in model, one worker, default TTL.

    With DIFFUSIOND_TEST_BROKER=1 the same tests run against the broker mode instead: a
    redis-server, one `diffusiond worker` and one `diffusiond serve --broker` API node.
    """
    if os.environ.get("DIFFUSIOND_TEST_BROKER") == "1":
        deployment = deploy(model_home, tmp_path_factory.mktemp("redis"), workers=1, apis=1)
        yield deployment.apis[0]
        assert deployment.stop() == []
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
