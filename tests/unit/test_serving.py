"""The uvicorn runner takes its limits from the settings."""

from __future__ import annotations

from starlette.applications import Starlette

from diffusiond.serving import GracefulServer
from diffusiond.settings import load_settings


def test_the_connection_limit_reaches_uvicorn() -> None:
    settings = load_settings({}, {"max_connections": "9"})
    server = GracefulServer(Starlette(), settings, lambda _signal: None)
    assert server.config.limit_concurrency == 9
    default = GracefulServer(Starlette(), load_settings({}, {}), lambda _signal: None)
    assert default.config.limit_concurrency == load_settings({}, {}).max_connections
