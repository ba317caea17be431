"""Wiring and running the server: registry, backend, engine, sweeper and uvicorn."""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from diffusiond.api.app import ApiConfig, create_app
from diffusiond.api.live import JobEvents
from diffusiond.backends.base import Backend
from diffusiond.engine.engine import Engine
from diffusiond.errors import ModelLoadError, SettingsError
from diffusiond.jobs.registry import GenerationRegistry, TtlSweeper
from diffusiond.jobs.store import open_store
from diffusiond.logs import configure_logging
from diffusiond.settings import Settings

log = logging.getLogger("diffusiond")


def make_backend(settings: Settings) -> Backend:
    """The backend `settings.backend` names, checked enough to fail fast on a bad model path."""
    if settings.backend == "diffusers":
        from diffusiond.backends.diffusers_backend import DiffusersBackend, check_model_path

        if settings.model is not None:
            check_model_path(settings.model)
        return DiffusersBackend(
            model_path=settings.model,
            home=settings.home,
            device=settings.device,
            torch_threads=settings.torch_threads,
            dtype=settings.dtype,
            model_config=settings.model_config,
            compile_model=settings.compile,
        )
    module_name, _, attribute = settings.backend.partition(":")
    if not module_name or not attribute:
        raise SettingsError(
            f"--backend must be 'diffusers' or module:factory, got {settings.backend!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"--backend {settings.backend!r} cannot be imported: {exc}") from None
    backend: Backend = factory(settings)
    return backend


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket created with an explicit IPPROTO_TCP.

    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on accepted sockets whose
    listener says proto == IPPROTO_TCP; uvicorn's own `bind_socket()` leaves proto 0, and
    then every response written in two parts (head, body) waits ~40 ms for the client's
    delayed ACK. With the protocol named, polls answer in about a millisecond.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SettingsError(f"--host/--port: cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def _yield_cpu_to_generation(niceness: int) -> None:
    """Run the event-loop thread below the generation threads, which were started before it.

    On a machine whose cores all do diffusion, every poll a client sends takes CPU from the
    generation; at a lower priority, polls are answered in the gaps the generation leaves
    (still within milliseconds) instead of stalling its threads, however fast clients poll.
    Linux keeps a nice value per thread; elsewhere this does nothing.
    """
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))
    except (AttributeError, OSError) as exc:
        log.debug("could not lower the HTTP thread's priority: %s", exc)


class Service:
    """The parts of a running server and their start and stop, in order."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        store = open_store(settings.store)
        self.persistent = store.persistent
        self.registry = GenerationRegistry(
            ttl_ms=settings.result_ttl_ms,
            store=store,
            max_result_bytes=settings.max_result_bytes,
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
        self._uvicorn: uvicorn.Server | None = None
        self._pending = self.registry.recover()

    def app(self) -> Starlette:
        return create_app(
            self.registry,
            self.engine,
            ApiConfig.from_settings(self.settings),
            lifespan=self._lifespan,
            events=self.events,
        )

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.engine.start()
        self.sweeper.start()
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()
        if self.settings.http_niceness:
            _yield_cpu_to_generation(self.settings.http_niceness)
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
                    self._uvicorn.should_exit = True

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
                self._uvicorn.should_exit = True
            return
        self.engine.resume(self._pending)
        self._pending = []
        print("diffusiond: ready", flush=True)

    def run(self) -> int:
        """Serve until stopped; 0 on a clean stop, 1 when the model failed to load."""
        config = uvicorn.Config(
            self.app(),
            host=self.settings.host,
            port=self.settings.port,
            log_level=self.settings.log_level,
            access_log=self.settings.log_level == "debug",
            log_config=None,  # configure_logging() already routed uvicorn's loggers
            lifespan="on",
            timeout_graceful_shutdown=5,  # for connections still open once the jobs are done
        )
        self._uvicorn = _GracefulServer(config, self.begin_shutdown)
        sock = bind_listening_socket(self.settings.host, self.settings.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"diffusiond: listening on http://{shown}:{port}", flush=True)
        # A signal that lands after uvicorn gave its handlers back must not raise either.
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, lambda *_: None)
        asyncio.run(self._uvicorn.serve(sockets=[sock]))
        if self.load_failure is not None:
            print(f"diffusiond: cannot start: {self.load_failure}", file=sys.stderr, flush=True)
            return 1
        return 0


class _GracefulServer(uvicorn.Server):
    """uvicorn, but the first stop signal drains (see `Service.begin_shutdown`) and a
    second one exits at once, with 128 + the signal's number."""

    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[int], None]) -> None:
        super().__init__(config)
        self._on_first_signal = on_first_signal
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            print("diffusiond: second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + sig)
        self._signalled = True
        self._on_first_signal(sig)


def refuse_unprotected_exposure(settings: Settings) -> None:
    """Listening beyond loopback without an API key needs --insecure."""
    if settings.api_key is not None or settings.insecure or is_loopback(settings.host):
        return
    raise SettingsError(
        f"refusing to listen on {settings.host} without an API key: anyone who can reach "
        "that address could run generations on this machine and read every result. Set "
        "IMAGE_API_KEY (or --api-key), or pass --insecure if the network is trusted."
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%")[0]).is_loopback for address in addresses
    )


def serve(settings: Settings) -> int:
    refuse_unprotected_exposure(settings)
    configure_logging(settings.log_level, as_json=settings.log_json)
    if settings.broker is not None:
        from diffusiond.broker.service import serve_broker

        return serve_broker(settings)  # an API node: the model lives in the workers
    return Service(settings, make_backend(settings)).run()
