"""`diffusiond serve --broker URL`: an API node with no model, over the shared queue."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError
from starlette.applications import Starlette

from diffusiond.api.app import ApiConfig, create_app
from diffusiond.api.events import JobEvents
from diffusiond.backends.factory import model_catalog
from diffusiond.backends.lora_files import lora_choices
from diffusiond.broker.bridge import LoopThread
from diffusiond.broker.node import BrokerEngine, BrokerRegistry
from diffusiond.broker.queue import JobOptions, open_queue
from diffusiond.errors import SettingsError
from diffusiond.redaction import redact_text, redact_url
from diffusiond.serving import GracefulServer
from diffusiond.settings import Settings

log = logging.getLogger("diffusiond")


class BrokerService:
    """The parts of an API node: the bridge loop, the registry and engine over SAQ, the
    notification relay and the sweep of lost workers' jobs, and the HTTP app."""

    def __init__(self, settings: Settings) -> None:
        assert settings.broker is not None
        self.settings = settings
        self.bridge = LoopThread(settings.broker)
        self.queue = open_queue(settings.broker)
        try:
            self.bridge.call(self._connect(), timeout_s=10)
        except Exception as exc:
            self.bridge.stop()
            raise SettingsError(
                f"--broker {redact_url(settings.broker)}: cannot reach Redis: "
                + redact_text(str(exc))
            ) from None
        self.registry = BrokerRegistry(self.bridge, self.queue)
        self.engine = BrokerEngine(
            self.bridge,
            self.queue,
            self.registry,
            options=JobOptions.from_settings(settings.result_ttl_ms, settings.broker_heartbeat_s),
            max_queue=settings.max_queue,
        )
        # The node checks each request's `model` against its own catalog of --models-dir:
        # the workers must be given the same one (each serves every model of its own dir).
        self.models = model_catalog(settings) if settings.backend == "diffusers" else None
        self.events = JobEvents()
        self._tasks: list[concurrent.futures.Future[None]] = []

    async def _connect(self) -> None:
        await self.queue.connect()
        await self.queue.count("queued")

    def app(self) -> Starlette:
        return create_app(
            self.registry,
            self.engine,
            ApiConfig.from_settings(self.settings),
            lifespan=self._lifespan,
            events=self.events,
            # This node's LoRA folder; each worker checks again against its own before
            # applying.
            loras=lora_choices(
                self.settings.models_dir,
                self.settings.loras_dir,
                self.models,
                lambda: self.engine.info().architecture,
            ),
            models=self.models,
        )

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._tasks = [
            self.bridge.spawn(self.registry.watch()),
            self.bridge.spawn(self.engine.sweep(self.settings.broker_sweep_s)),
        ]
        print("diffusiond: ready", flush=True)
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            try:
                self.bridge.call(self.queue.disconnect(), timeout_s=5)
            except Exception as exc:  # stopping anyway
                log.debug("broker disconnect: %s", exc)  # the log filter masks credentials
            self.bridge.stop()

    def run(self) -> int:
        server = GracefulServer(self.app(), self.settings, lambda _signal: self._stop(server))
        shown = redact_url(self.settings.broker)
        print(f"diffusiond: API node of the queue at {shown}", flush=True)
        server.run_until_stopped()
        return 0

    def _stop(self, server: GracefulServer) -> None:
        """Jobs run on the workers, not here: stop admitting, end the streams, stop."""
        self.engine.drain()

        def stop() -> None:
            self.events.close()
            server.stop()

        threading.Thread(target=stop, name="stop", daemon=True).start()


def serve_broker(settings: Settings) -> int:
    """Serve as an API node of the queue at `settings.broker` (`diffusiond serve --broker`)."""
    try:
        service = BrokerService(settings)
    except RedisError as exc:
        raise SettingsError(
            f"--broker {redact_url(settings.broker)}: {redact_text(str(exc))}"
        ) from None
    return service.run()
