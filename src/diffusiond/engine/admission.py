"""What admitting jobs means in both deployments, written once: the bound on waiting jobs
(IMAGE_MAX_QUEUE) and the drain that stops admitting. The in-process `Engine` and the broker
node's `BrokerEngine` both build on `Admission`."""

from __future__ import annotations

from collections.abc import Callable

from diffusiond.errors import ServerBusy


class Admission:
    def __init__(self, max_queue: int) -> None:
        self._max_queue = max_queue
        self._draining = False

    @property
    def max_queue(self) -> int:
        """How many admitted jobs may wait beyond the ones that run."""
        return self._max_queue

    @property
    def draining(self) -> bool:
        """True once stopping: nothing more is admitted."""
        return self._draining

    def _refuse_if_draining(self, retry_after_s: Callable[[], int]) -> None:
        if self._draining:
            raise ServerBusy(
                "the server is shutting down and takes no new generations",
                retry_after_s=retry_after_s(),
            )
