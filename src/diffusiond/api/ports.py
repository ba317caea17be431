"""What the HTTP layer needs from the jobs and the engine: one process or a broker behind it.

The single-process `GenerationRegistry` and `Engine` fit these protocols, and so do the
broker mode's `BrokerRegistry` and `BrokerEngine` (diffusiond.broker), whose jobs live in
Redis and run on worker processes.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable, Collection, Sequence
from typing import ParamSpec, Protocol, TypeVar

from diffusiond.backends.base import BackendInfo
from diffusiond.backends.catalog import ModelEntry
from diffusiond.engine.engine import EngineStats
from diffusiond.jobs.models import GenerationRequest, Job, JobListener, JobStatus, LoraWeight

P = ParamSpec("P")
T = TypeVar("T")


class JobSource(Protocol):
    """Reads jobs, and tells listeners when one changes or is deleted (`JobChanged`)."""

    def get(self, job_id: str) -> Job: ...

    def exists(self, job_id: str) -> bool: ...

    def list(
        self, statuses: Collection[JobStatus] | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """Newest first; enough for a listing's summaries (a broker leaves out the progress
        and the result, which a listing does not show)."""
        ...

    def add_listener(self, listener: JobListener) -> None: ...


class JobRunner(Protocol):
    """Admits, cancels and runs jobs, and says how it is doing."""

    def submit(self, request: GenerationRequest) -> Job: ...

    def cancel(self, job_id: str) -> Job: ...

    def queue_position(self, job_id: str) -> int | None: ...

    def stats(self) -> EngineStats: ...

    def info(self) -> BackendInfo: ...

    def health_extra(self) -> dict[str, object]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def load_error(self) -> str | None: ...

    @property
    def max_queue(self) -> int: ...

    @property
    def draining(self) -> bool: ...


class LoraPort(Protocol):
    """The LoRAs a request may name: listed by GET /v1/loras, checked before admission."""

    def listing(self) -> builtins.list[dict[str, str]]:
        """{"name", "architecture"} of each LoRA, by name."""
        ...

    def check(self, model: str | None, loras: Sequence[LoraWeight]) -> None:
        """Raise InvalidRequest (field `loras`) for an unknown LoRA or one made for another
        architecture than the model's (`model`: its id; None: the default model)."""


class ModelDirectory(Protocol):
    """The models a request may name (backends/catalog.py `ModelCatalog`). An API node in
    broker mode has its own, of the same --models-dir its workers are given."""

    default_id: str

    def entries(self) -> builtins.list[ModelEntry]:
        """Every model, the directory rescanned first."""
        ...

    def check(self, model_id: str | None) -> None:
        """`InvalidRequest` naming `model` and the ids there are, unless it names one."""
        ...


class Offload:
    """How a handler calls the ports: inline where a call takes microseconds (one process),
    on a worker thread where an implementation says it blocks (a class attribute
    `blocks_event_loop = True`: the broker's calls are Redis round trips, which a slow or
    paused Redis holds for seconds). So a slow Redis holds up only the requests that need
    it, never the event loop, the other requests and the streams."""

    def __init__(self, *ports: object) -> None:
        self.blocking = any(getattr(port, "blocks_event_loop", False) for port in ports)

    async def __call__(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self.blocking:
            return await asyncio.to_thread(function, *args, **kwargs)
        return function(*args, **kwargs)
