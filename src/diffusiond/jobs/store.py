"""Where jobs are kept. The registry owns the rules; a store only keeps records.

Two stores share one interface: `MemoryStore` (the default; a restart forgets every job)
and `SqliteStore` (jobs and their images survive a restart). Both keep every job in memory
for reads; the sqlite store also writes each state change through to disk before the call
returns, while progress-only updates are coalesced and written by a background flusher, so
a diffusion step never waits on a disk write.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson

from diffusiond.errors import SettingsError, StoreError
from diffusiond.jobs.edit_json import edit_from_json, edit_to_json
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    Job,
    JobError,
    JobStatus,
    LoraWeight,
    Progress,
    Result,
    Stage,
    StageTimings,
)

log = logging.getLogger(__name__)


class JobStore(Protocol):
    """Keeps job snapshots by id. Callers hold the registry's lock around every call."""

    persistent: bool  # whether jobs outlive the process

    def get(self, job_id: str) -> Job | None: ...

    def put(self, job: Job) -> None:
        """Keep `job`; durable (on disk, for a persistent store) when this returns.

        Raises `StoreError` when it cannot be kept, and then keeps nothing of it."""

    def put_progress(self, job: Job) -> None:
        """Keep a progress-only change; a persistent store may write it a little later."""

    def delete(self, job_id: str) -> bool:
        """Forget the job; `StoreError` (and the job kept) when that cannot be written."""

    def oldest_first(self) -> Iterator[Job]: ...

    def newest_first(self) -> Iterator[Job]: ...

    def __len__(self) -> int: ...

    def close(self) -> None:
        """Write whatever is pending and release files; the store is unusable after."""


class MemoryStore:
    """Jobs in a dict, in creation order (so newest-first is a reversed walk)."""

    persistent = False

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def put(self, job: Job) -> None:
        self._jobs[job.id] = job

    def put_progress(self, job: Job) -> None:
        self._jobs[job.id] = job

    def delete(self, job_id: str) -> bool:
        return self._jobs.pop(job_id, None) is not None

    def oldest_first(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def newest_first(self) -> Iterator[Job]:
        return reversed(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        pass


_SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""


class SqliteStore(MemoryStore):
    """Jobs in a SQLite database (WAL mode), mirrored in memory for reads.

    `put()` commits before it returns, and changes the memory mirror only once the commit
    succeeded (a failed write raises `StoreError`, and memory keeps what the disk has);
    `put_progress()` only marks the job dirty, and a
    flusher thread writes dirty jobs every `flush_interval_s` in one transaction. A job's
    images are written once, when it completes. With `synchronous=NORMAL` in WAL mode a
    commit survives the process being killed; a power cut may lose the last commits.
    """

    persistent = True

    def __init__(self, path: Path, *, flush_interval_s: float = 1.0) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = _lock_file(path)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._check_version()
            self._jobs = self._load()
        except (sqlite3.Error, OSError, ValueError, KeyError, TypeError) as exc:
            raise SettingsError(f"IMAGE_STORE: cannot use the sqlite store {path}: {exc}") from None
        self._dirty: set[str] = set()
        self._closed = False
        self._flush_interval_s = flush_interval_s
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="store-flush", daemon=True)
        self._flusher.start()

    # -- the interface (reads come from the memory mirror) ---------------------------------

    def put(self, job: Job) -> None:
        with self._lock:
            self._write([job])
            self._jobs[job.id] = job
            self._dirty.discard(job.id)

    def put_progress(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            self._dirty.add(job.id)

    def delete(self, job_id: str) -> bool:
        with self._lock:
            if job_id not in self._jobs:
                return False
            with self._transaction():
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                self._db.execute("DELETE FROM images WHERE job_id = ?", (job_id,))
            del self._jobs[job_id]
            self._dirty.discard(job_id)
            return True

    def flush(self) -> int:
        """Write the dirty (progress-only) jobs now; how many were written."""
        with self._lock:
            if self._closed or not self._dirty:
                return 0
            jobs = [self._jobs[job_id] for job_id in self._dirty if job_id in self._jobs]
            self._write(jobs)  # a failure keeps them dirty, for the next flush
            self._dirty.clear()
            return len(jobs)

    def close(self) -> None:
        self._stop.set()
        if self._flusher.is_alive() and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            self._db.close()
            os.close(self._owner)

    # -- disk ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One committed transaction, or `StoreError` with everything in it rolled back."""
        if self._closed:
            raise StoreError("the job store is closed")
        try:
            self._db.execute("BEGIN")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            log.error("writing to the job store %s failed: %s", self.path, exc)
            raise StoreError(f"the job store could not save the change: {exc}") from None

    def _write(self, jobs: list[Job]) -> None:
        with self._transaction():
            for job in jobs:
                self._db.execute(
                    "INSERT INTO jobs (id, record) VALUES (?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                    (job.id, orjson.dumps(_record(job))),
                )
                if job.result is not None:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO images (job_id, idx, png) VALUES (?, ?, ?)",
                        [(job.id, i, image.png) for i, image in enumerate(job.result.images)],
                    )

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,)
            )
        elif row[0] != _SCHEMA_VERSION:
            raise ValueError(f"schema version {row[0]}, this diffusiond reads {_SCHEMA_VERSION}")

    def _load(self) -> dict[str, Job]:
        pngs: dict[str, dict[int, bytes]] = {}
        for job_id, idx, png in self._db.execute("SELECT job_id, idx, png FROM images"):
            pngs.setdefault(job_id, {})[idx] = bytes(png)
        jobs: dict[str, Job] = {}
        for (record,) in self._db.execute("SELECT record FROM jobs ORDER BY seq"):
            job = _job(orjson.loads(record), pngs)
            jobs[job.id] = job
        return jobs

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            try:
                self.flush()
            except Exception:  # a failed flush is retried at the next tick or at a transition
                log.exception("writing progress to %s failed", self.path)


def _lock_file(path: Path) -> int:
    """Hold an exclusive lock beside the database: one server per store (freed on exit)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError("another diffusiond process is using it") from None
    return fd


def open_store(spec: str) -> JobStore:
    """The store `spec` names: "memory" or "sqlite:PATH" (IMAGE_STORE / --store)."""
    if spec == "memory":
        return MemoryStore()
    if spec.startswith("sqlite:"):
        return SqliteStore(Path(spec.removeprefix("sqlite:")).expanduser())
    raise SettingsError(f"IMAGE_STORE must be 'memory' or 'sqlite:PATH', got {spec!r}")


# -- records: a job as JSON, without its PNG bytes -------------------------------------------


def _record(job: Job) -> dict[str, Any]:
    request = job.request
    record: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "createdAt": job.created_at,
        "updatedAt": job.updated_at,
        "startedAt": job.started_at,
        "version": job.version,
        "request": {
            "prompt": request.prompt,
            "negativePrompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "cfgScale": request.cfg_scale,
            "seed": request.seed,
            "sampler": request.sampler,
            "count": request.count,
            "previewEvery": request.preview_every,
            "model": request.model,
            "loras": [[lora.name, lora.weight] for lora in request.loras],
            "scheduler": request.scheduler,
            "clipSkip": request.clip_skip,
        },
    }
    # A restored pending edit job must run with its images. Once it has started they are
    # not needed again (a job running at a restart ends SERVER_RESTARTED), and progress
    # writes stay small: the images are written once, not on every flush.
    if request.edit is not None and job.status is JobStatus.PENDING:
        record["request"]["edit"] = edit_to_json(request.edit)
    if job.progress is not None:
        p = job.progress
        record["progress"] = [
            p.stage.value,
            p.current_step,
            p.total_steps,
            p.percentage,
            p.current_image,
            p.total_images,
        ]
    if job.error is not None:
        record["error"] = {"message": job.error.message, "code": job.error.code.value}
    if job.result is not None:
        record["result"] = {
            "timeTaken": job.result.time_taken_ms,
            "format": job.result.format,
            "images": [[image.seed, image.width, image.height] for image in job.result.images],
        }
        if job.result.timings is not None:
            record["result"]["timings"] = dataclasses.asdict(job.result.timings)
    return record


def _job(record: dict[str, Any], pngs: dict[str, dict[int, bytes]]) -> Job:
    request = record["request"]
    progress = None
    if "progress" in record:
        stage, step, total, percentage, image, images = record["progress"]
        progress = Progress(Stage(stage), step, total, percentage, image, images)
    error = None
    if "error" in record:
        error = JobError(record["error"]["message"], ErrorCode(record["error"]["code"]))
    result = None
    if "result" in record:
        stored = pngs.get(record["id"], {})
        images = tuple(
            GeneratedImage(stored[i], seed, width, height)
            for i, (seed, width, height) in enumerate(record["result"]["images"])
        )
        stored_timings = record["result"].get("timings")
        timings = StageTimings(**stored_timings) if stored_timings is not None else None
        result = Result(images, record["result"]["timeTaken"], record["result"]["format"], timings)
    return Job(
        id=record["id"],
        request=GenerationRequest(
            prompt=request["prompt"],
            negative_prompt=request["negativePrompt"],
            width=request["width"],
            height=request["height"],
            steps=request["steps"],
            cfg_scale=request["cfgScale"],
            seed=request["seed"],
            sampler=request["sampler"],
            count=request["count"],
            preview_every=request.get("previewEvery", 0),
            edit=edit_from_json(request.get("edit")),
            model=request.get("model"),
            loras=tuple(LoraWeight(name, weight) for name, weight in request.get("loras", ())),
            scheduler=request.get("scheduler", "discrete"),
            clip_skip=request.get("clipSkip"),
        ),
        status=JobStatus(record["status"]),
        created_at=record["createdAt"],
        updated_at=record["updatedAt"],
        started_at=record["startedAt"],
        progress=progress,
        result=result,
        error=error,
        version=record.get("version", 0),
    )
