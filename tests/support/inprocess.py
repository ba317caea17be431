"""The real app, `Engine` and `GenerationRegistry` in this process, over a fake backend,
driven through Starlette's TestClient (httpx, no socket)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.testclient import TestClient

from diffusiond.api.app import ApiConfig, create_app
from diffusiond.api.events import JobEvents
from diffusiond.engine.engine import Engine
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.jobs.store import JobStore
from tests.support.fakes import FakeBackend

CONFIG = ApiConfig(max_batch=4, poll_interval_ms=250, heartbeat_s=15.0, event_interval_s=0.1)


@dataclass
class InProcessApi:
    client: TestClient
    registry: GenerationRegistry
    engine: Engine
    backend: FakeBackend


@contextmanager
def in_process_api(
    backend: FakeBackend | None = None,
    *,
    config: ApiConfig = CONFIG,
    max_queue: int = 2,
    ttl_ms: int = 60_000,
    store: JobStore | None = None,
) -> Iterator[InProcessApi]:
    """A started engine and its app; on exit the engine stops and the streams end."""
    backend = backend if backend is not None else FakeBackend()
    registry = GenerationRegistry(ttl_ms=ttl_ms, store=store)
    engine = Engine(registry, backend, max_concurrent=1, max_queue=max_queue)
    engine.start()
    engine.load_model()
    events = JobEvents()
    app = create_app(registry, engine, config, events=events)
    try:
        # A loopback name, as a browser or curl on this machine sends (the default
        # "testserver" is a foreign Host, which the app refuses).
        with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
            yield InProcessApi(client, registry, engine, backend)
            events.close()
    finally:
        engine.shutdown()
