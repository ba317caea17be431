"""Serving HTTP, the same for both deployments: the listening socket, uvicorn with a
graceful first stop signal, the HTTP thread's priority, and who may listen where."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from diffusiond.errors import SettingsError
from diffusiond.settings import Settings

log = logging.getLogger("diffusiond")


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


def lower_thread_priority(niceness: int) -> None:
    """Run the calling thread (the event loop's) below the generation threads.

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


class GracefulServer(uvicorn.Server):
    """uvicorn serving `app` as `settings` say, where the first stop signal calls
    `on_first_signal` (which drains, then calls `stop()`) and a second one exits at once,
    with 128 + the signal's number."""

    def __init__(
        self, app: Starlette, settings: Settings, on_first_signal: Callable[[int], None]
    ) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                access_log=settings.log_level == "debug",
                log_config=None,  # configure_logging() already routed uvicorn's loggers
                lifespan="on",
                timeout_graceful_shutdown=5,  # for connections still open once jobs are done
                # Past this many open connections and tasks uvicorn itself answers 503.
                limit_concurrency=settings.max_connections,
            )
        )
        self._settings = settings
        self._on_first_signal = on_first_signal
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            print("diffusiond: second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + sig)
        self._signalled = True
        self._on_first_signal(sig)

    def stop(self) -> None:
        """End serving (any thread): uvicorn closes the connections and the lifespan."""
        self.should_exit = True

    def run_until_stopped(self) -> None:
        """Listen, print the address, and serve until stopped."""
        sock = bind_listening_socket(self._settings.host, self._settings.port)
        # Listening before the line says so: a client that connects on reading it must not
        # be refused while uvicorn is still starting (it listens on the socket again).
        sock.listen(self.config.backlog)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"diffusiond: listening on http://{shown}:{port}", flush=True)
        # A signal that lands after uvicorn gave its handlers back must not raise either.
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, lambda *_: None)
        asyncio.run(self.serve(sockets=[sock]))


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
