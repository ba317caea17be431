"""Where jobs are kept. The registry owns the rules; a store only keeps records."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from diffusiond.jobs.models import Job


class JobStore(Protocol):
    """Keeps job snapshots by id. Callers hold the registry's lock around every call."""

    def get(self, job_id: str) -> Job | None: ...

    def put(self, job: Job) -> None: ...

    def delete(self, job_id: str) -> bool: ...

    def newest_first(self) -> Iterator[Job]: ...

    def __len__(self) -> int: ...


class MemoryStore:
    """Jobs in a dict, in creation order (so newest-first is a reversed walk)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def put(self, job: Job) -> None:
        self._jobs[job.id] = job

    def delete(self, job_id: str) -> bool:
        return self._jobs.pop(job_id, None) is not None

    def newest_first(self) -> Iterator[Job]:
        return reversed(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)
