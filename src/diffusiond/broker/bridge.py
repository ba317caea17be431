"""A private event loop on its own thread, where SAQ's asyncio queue lives in an API node.

The HTTP handlers call the registry and engine synchronously (as in the single-process
mode, where those calls take microseconds); here each call is one or a few Redis round
trips on SAQ's async client, run on this loop and waited for with a timeout. On loopback a
round trip is a fraction of a millisecond, so this keeps the endpoints and their tests
unchanged for the price of that wait; a Redis that does not answer becomes a 503
SERVER_NOT_READY naming the broker, not a hung request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from redis.exceptions import RedisError

from diffusiond.errors import ServerNotReady
from diffusiond.redaction import redact_text, redact_url

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0


class LoopThread:
    def __init__(self, broker_url: str) -> None:
        self._shown_url = redact_url(broker_url)  # what messages may say of the broker
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="broker-loop", daemon=True
        )
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run `coroutine` on the loop and wait for its result; broker failures are 503s."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ServerNotReady(
                f"the broker (--broker {self._shown_url}) did not answer within {timeout_s:g} s"
            ) from None
        except (RedisError, OSError) as exc:
            raise ServerNotReady(
                f"the broker (--broker {self._shown_url}) is unreachable: {redact_text(str(exc))}"
            ) from None

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> concurrent.futures.Future[None]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
