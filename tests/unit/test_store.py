"""The sqlite store: what it writes, when, and what it reads back after a restart."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from diffusiond.errors import SettingsError, StoreError
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
)
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.jobs.store import MemoryStore, SqliteStore, open_store

REQUEST = GenerationRequest(
    prompt="a lighthouse", negative_prompt="fog", width=128, height=64, steps=7,
    cfg_scale=4.5, seed=42, sampler="ddim", count=2, model="other",
    loras=(LoraWeight("detail", 0.8), LoraWeight("style", -1.5)), scheduler="karras",
    clip_skip=2,
)  # fmt: skip
RESULT = Result(
    images=(
        GeneratedImage(png=b"\x89PNG first", seed=42, width=128, height=64),
        GeneratedImage(png=b"\x89PNG second", seed=43, width=128, height=64),
    ),
    time_taken_ms=1234,
)


def job(job_id: str = "gen_1", **changes: object) -> Job:
    base = Job(id=job_id, request=REQUEST, status=JobStatus.PENDING, created_at=10, updated_at=10)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def abandon(store: SqliteStore) -> None:
    """Drop the store the way a killed process does: no flush, no final write.

    The flusher is stopped first (the test must not race it); then the database handle and
    the lock file are released without `close()`, which would write pending progress.
    """
    store._stop.set()
    store._flusher.join(timeout=5)
    store._db.close()
    os.close(store._owner)


def rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        return count


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


def test_every_field_survives_a_reopen(path: Path) -> None:
    store = SqliteStore(path)
    jobs = [
        job("gen_a", status=JobStatus.COMPLETE, started_at=11, updated_at=20, result=RESULT),
        job(
            "gen_b",
            status=JobStatus.ERROR,
            updated_at=30,
            error=JobError("Generation failed: boom", ErrorCode.OUT_OF_MEMORY),
        ),
        job(
            "gen_c",
            status=JobStatus.IN_PROGRESS,
            started_at=40,
            progress=Progress(Stage.DECODING, 1, 1, 95.5, 2, 2),
        ),
        job("gen_d"),
    ]
    for one in jobs:
        store.put(one)
    store.close()

    reopened = SqliteStore(path)
    assert list(reopened.oldest_first()) == jobs
    assert list(reopened.newest_first()) == jobs[::-1]
    assert reopened.get("gen_a") == jobs[0]
    reopened.close()


def test_progress_is_coalesced_not_written_per_step(path: Path) -> None:
    store = SqliteStore(path, flush_interval_s=3600)  # no timed flush during the test
    running = job(status=JobStatus.IN_PROGRESS, started_at=11)
    store.put(running)
    for step in range(1, 50):
        progress = Progress(Stage.DIFFUSION, step, 50, step * 1.5, 1, 1)
        store.put_progress(dataclasses.replace(running, progress=progress, updated_at=11 + step))
    assert store.get(running.id) is not None
    assert store.get(running.id).progress.current_step == 49  # type: ignore[union-attr]
    with sqlite3.connect(path) as db:
        (record,) = db.execute("SELECT record FROM jobs").fetchone()
    assert b'"progress":' not in record  # nothing of the 49 steps reached the disk yet
    assert store.flush() == 1  # ...and all of them are one write
    assert store.flush() == 0
    with sqlite3.connect(path) as db:
        (record,) = db.execute("SELECT record FROM jobs").fetchone()
    assert b'"progress":' in record
    store.close()


def test_a_transition_is_on_disk_when_put_returns(path: Path) -> None:
    store = SqliteStore(path, flush_interval_s=3600)
    store.put(job())
    assert rows(path) == 1
    store.put(job(status=JobStatus.COMPLETE, result=RESULT))
    with sqlite3.connect(path) as db:
        images = db.execute("SELECT idx, png FROM images ORDER BY idx").fetchall()
    assert images == [(0, b"\x89PNG first"), (1, b"\x89PNG second")]
    assert store.delete("gen_1") is True
    assert store.delete("gen_1") is False
    assert rows(path) == 0
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM images").fetchone()[0] == 0
    store.close()


def test_close_writes_pending_progress(path: Path) -> None:
    store = SqliteStore(path, flush_interval_s=3600)
    running = job(status=JobStatus.IN_PROGRESS, started_at=11)
    store.put(running)
    moved = dataclasses.replace(running, progress=Progress(Stage.DIFFUSION, 3, 9, 30.0, 1, 1))
    store.put_progress(moved)
    store.close()
    reopened = SqliteStore(path)
    assert reopened.get(running.id) == moved
    reopened.close()


def test_one_server_per_store(path: Path) -> None:
    store = SqliteStore(path)
    with pytest.raises(SettingsError, match="another diffusiond process is using it"):
        SqliteStore(path)
    store.close()
    SqliteStore(path).close()  # free again once closed


def test_a_file_that_is_not_a_database_is_a_clear_error(path: Path) -> None:
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SettingsError, match=f"IMAGE_STORE: cannot use the sqlite store {path}"):
        SqliteStore(path)


def test_a_newer_schema_is_refused(path: Path) -> None:
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(SettingsError, match="schema version 99"):
        SqliteStore(path)


def test_open_store_specs(path: Path) -> None:
    memory = open_store("memory")
    assert isinstance(memory, MemoryStore)
    assert memory.persistent is False
    store = open_store(f"sqlite:{path}")
    assert isinstance(store, SqliteStore)
    assert store.persistent is True  # the server keeps queued jobs pending at shutdown
    store.close()
    with pytest.raises(SettingsError, match="IMAGE_STORE"):
        open_store("redis:x")


def test_the_registry_recovers_from_a_persistent_store(path: Path) -> None:
    store = SqliteStore(path)
    registry = GenerationRegistry(ttl_ms=60_000, store=store)
    done = registry.create(REQUEST)
    registry.start(done.id)
    registry.complete(done.id, RESULT)
    running = registry.create(REQUEST)
    registry.start(running.id)
    registry.report_progress(running.id, Progress(Stage.DIFFUSION, 1, 7, 10.0, 1, 2))
    waiting = [registry.create(REQUEST) for _ in range(2)]
    abandon(store)  # as if the process had died here: nothing more is written

    again = GenerationRegistry(ttl_ms=60_000, store=SqliteStore(path))
    pending = again.recover()
    assert [one.id for one in pending] == [one.id for one in waiting]
    interrupted = again.get(running.id)
    assert interrupted.status is JobStatus.ERROR
    assert interrupted.error is not None
    assert interrupted.error.code is ErrorCode.SERVER_RESTARTED
    assert interrupted.progress is None
    assert again.get(done.id).result == RESULT
    assert again.result_bytes() == len(b"\x89PNG first") + len(b"\x89PNG second")
    again.close()


def test_progress_lost_with_the_process_is_not_read_back(path: Path) -> None:
    store = SqliteStore(path, flush_interval_s=3600)
    running = job(status=JobStatus.IN_PROGRESS, started_at=11)
    store.put(running)
    store.put_progress(
        dataclasses.replace(running, progress=Progress(Stage.DIFFUSION, 3, 9, 30.0, 1, 1))
    )
    abandon(store)
    reopened = SqliteStore(path)
    assert reopened.get(running.id) == running  # the unflushed step died with the process
    reopened.close()


class FailingConnection:
    """Stands in for the store's sqlite connection: while `failures` is above zero, each
    INSERT fails as a full or broken disk would make it fail, and counts one down."""

    def __init__(self, db: sqlite3.Connection, message: str = "disk I/O error") -> None:
        self._db = db
        self.message = message
        self.failures = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.failures and sql.lstrip().upper().startswith("INSERT"):
            self.failures -= 1
            raise sqlite3.OperationalError(self.message)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._db.executemany(sql, *args)

    def close(self) -> None:
        self._db.close()


def failing_store(
    path: Path, message: str = "disk I/O error"
) -> tuple[SqliteStore, FailingConnection]:
    store = SqliteStore(path, flush_interval_s=3600)
    connection = FailingConnection(store._db, message)
    store._db = connection  # type: ignore[assignment]
    return store, connection


def test_a_failed_write_changes_neither_disk_nor_memory(path: Path) -> None:
    store, disk = failing_store(path)
    pending = job()
    store.put(pending)
    disk.failures = 2
    with pytest.raises(StoreError, match="disk I/O error"):
        store.put(job(status=JobStatus.CANCELLED, updated_at=20))
    with pytest.raises(StoreError):
        store.put(job("gen_2"))
    assert store.get("gen_1") == pending
    assert store.get("gen_2") is None
    assert len(store) == 1
    store.close()
    reopened = SqliteStore(path)
    assert list(reopened.oldest_first()) == [pending]
    reopened.close()


def test_a_failed_complete_ends_the_job_as_error_on_disk_too(path: Path) -> None:
    store, disk = failing_store(path, "database or disk is full")
    registry = GenerationRegistry(ttl_ms=60_000, store=store)
    running = registry.start(registry.create(REQUEST).id)
    disk.failures = 1  # the result's write fails; the error's write that follows does not
    with pytest.raises(StoreError, match="disk is full"):
        registry.complete(running.id, RESULT)
    ended = registry.get(running.id)
    assert ended.status is JobStatus.ERROR
    registry.close()
    again = GenerationRegistry(ttl_ms=60_000, store=SqliteStore(path))
    assert again.get(running.id) == ended  # disk and memory agree
    assert again.result_bytes() == 0
    again.close()


def test_a_failed_create_leaves_no_pending_job_behind(path: Path) -> None:
    store, disk = failing_store(path)
    registry = GenerationRegistry(ttl_ms=60_000, store=store)
    disk.failures = 1
    with pytest.raises(StoreError):
        registry.create(REQUEST)
    assert registry.list() == []
    assert registry.recover() == []
    registry.close()
    assert rows(path) == 0
