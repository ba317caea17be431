"""The single-process deployment: registry, engine with the model, sweeper, and the app."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from diffusiond.api.app import ApiConfig, create_app
from diffusiond.api.events import JobEvents
from diffusiond.backends.base import Backend
from diffusiond.backends.factory import make_backend
from diffusiond.backends.lora_files import lora_choices
from diffusiond.backends.model_set import ModelSet
from diffusiond.engine.engine import Engine
from diffusiond.errors import ModelLoadError
from diffusiond.jobs.registry import GenerationRegistry, TtlSweeper
from diffusiond.jobs.store import open_store
from diffusiond.serving import GracefulServer, lower_thread_priority
from diffusiond.settings import Settings

log = logging.getLogger("diffusiond")


class Service:
    """The parts of a running server and their start and stop, in order."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        store = open_store(settings.store)
        self.persistent = store.persistent
        self.registry = GenerationRegistry(
            ttl_ms=settings.result_ttl_ms,
            store=store,
            max_result_bytes=settings.max_result_bytes,
            max_jobs=settings.max_jobs,
        )
        self.engine = Engine(
            self.registry,
            backend,
            max_concurrent=settings.max_concurrent,
            max_queue=settings.max_queue,
            timeout_ms=settings.generation_timeout_ms,
        )
        self.sweeper = TtlSweeper(self.registry, settings.cleanup_interval_ms)
        self.events = JobEvents()
        self.load_failure: str | None = None
        self._uvicorn: GracefulServer | None = None
        self._pending = self.registry.recover()

    def app(self) -> Starlette:
        catalog = self.backend.catalog if isinstance(self.backend, ModelSet) else None
        return create_app(
            self.registry,
            self.engine,
            ApiConfig.from_settings(self.settings),
            lifespan=self._lifespan,
            events=self.events,
            loras=lora_choices(
                self.settings.models_dir,
                self.settings.loras_dir,
                catalog,
                lambda: self.engine.info().architecture,
            ),
            models=catalog,
        )

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.engine.start()
        self.engine.resume(self._pending)  # before the model loads: ahead of every new job
        self._pending = []
        self.sweeper.start()
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()
        if self.settings.http_niceness:
            lower_thread_priority(self.settings.http_niceness)
        try:
            yield
        finally:
            self.sweeper.stop()
            await asyncio.to_thread(self.engine.shutdown, keep_pending=self.persistent)
            self.registry.close()

    def begin_shutdown(self, signal_number: int) -> None:
        """The first SIGTERM/SIGINT: stop admitting, give running jobs the grace time, stop."""
        grace = self.settings.grace_seconds
        print(
            f"diffusiond: {signal.Signals(signal_number).name}: shutting down; running "
            f"generations get up to {grace} s to finish (a second signal exits at once)",
            flush=True,
        )

        def drain() -> None:
            try:
                if not self.engine.drain(grace):
                    log.warning("grace time of %d s over: running generations cancelled", grace)
            finally:
                self.events.close()  # end the event streams, or uvicorn would wait on them
                if self._uvicorn is not None:
                    self._uvicorn.stop()

        threading.Thread(target=drain, name="drain", daemon=True).start()

    def _load_model(self) -> None:
        try:
            self.engine.load_model()
        except BaseException as exc:
            self.load_failure = str(exc) or type(exc).__name__
            log.error(
                "cannot serve: %s", self.load_failure, exc_info=not isinstance(exc, ModelLoadError)
            )
            if self._uvicorn is not None:
                self._uvicorn.stop()
            return
        print("diffusiond: ready", flush=True)

    def run(self) -> int:
        """Serve until stopped; 0 on a clean stop, 1 when the model failed to load."""
        self._uvicorn = GracefulServer(self.app(), self.settings, self.begin_shutdown)
        self._uvicorn.run_until_stopped()
        if self.load_failure is not None:
            print(f"diffusiond: cannot start: {self.load_failure}", file=sys.stderr, flush=True)
            return 1
        return 0


def serve(settings: Settings) -> int:
    """Serve with the model in this process (`diffusiond serve` without --broker)."""
    return Service(settings, make_backend(settings)).run()
