from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from diffusiond.errors import AlreadyTerminal, NotFound, StoreError
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    Job,
    JobError,
    JobStatus,
    Progress,
    Result,
    Stage,
)
from diffusiond.jobs.registry import GenerationRegistry, TtlSweeper
from diffusiond.jobs.store import MemoryStore

REQUEST = GenerationRequest(prompt="a cat")
RESULT = Result(images=(GeneratedImage(png=b"png", seed=1, width=64, height=64),), time_taken_ms=5)
ERROR = JobError("Generation failed: boom", ErrorCode.BACKEND_ERROR)


class FakeClock:
    def __init__(self, now: int = 1_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def progress(percentage: float, step: int = 1) -> Progress:
    return Progress(Stage.DIFFUSION, step, 20, percentage, 1, 1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> GenerationRegistry:
    return GenerationRegistry(ttl_ms=300_000, clock=clock)


def test_create_then_get(registry: GenerationRegistry, clock: FakeClock) -> None:
    job = registry.create(REQUEST)
    assert job.status is JobStatus.PENDING
    assert job.created_at == job.updated_at == clock.now
    assert registry.get(job.id) == job


def test_get_unknown_raises_not_found(registry: GenerationRegistry) -> None:
    with pytest.raises(NotFound):
        registry.get("gen_0_nothing")


def test_each_change_moves_updated_at(registry: GenerationRegistry, clock: FakeClock) -> None:
    job = registry.create(REQUEST)
    clock.now += 5
    started = registry.start(job.id)
    assert started.status is JobStatus.IN_PROGRESS
    assert started.updated_at == clock.now
    clock.now += 5
    assert registry.report_progress(job.id, progress(10)).updated_at == clock.now
    clock.now += 5
    done = registry.complete(job.id, RESULT)
    assert done.status is JobStatus.COMPLETE
    assert done.result == RESULT
    assert done.progress is None
    assert done.updated_at == clock.now
    assert done.created_at == job.created_at


def test_updated_at_never_goes_back_with_the_clock(
    registry: GenerationRegistry, clock: FakeClock
) -> None:
    job = registry.create(REQUEST)
    clock.now -= 500
    assert registry.start(job.id).updated_at == job.updated_at


def test_percentage_never_decreases(registry: GenerationRegistry) -> None:
    job = registry.create(REQUEST)
    registry.start(job.id)
    registry.report_progress(job.id, progress(40, step=8))
    lower = registry.report_progress(job.id, progress(30, step=9))
    assert lower.progress is not None
    assert lower.progress.percentage == 40
    assert lower.progress.current_step == 9


@pytest.mark.parametrize("end", ["complete", "fail", "cancel"])
def test_a_terminal_job_never_changes_again(registry: GenerationRegistry, end: str) -> None:
    job = registry.create(REQUEST)
    registry.start(job.id)
    {
        "complete": lambda: registry.complete(job.id, RESULT),
        "fail": lambda: registry.fail(job.id, ERROR),
        "cancel": lambda: registry.cancel(job.id),
    }[end]()
    final = registry.get(job.id)
    late_writes: list[Callable[[], Job]] = [
        lambda: registry.report_progress(job.id, progress(99)),
        lambda: registry.start(job.id),
        lambda: registry.complete(job.id, RESULT),
        lambda: registry.fail(job.id, ERROR),
    ]
    for late_write in late_writes:
        with pytest.raises(AlreadyTerminal):
            late_write()
    assert registry.get(job.id) == final


def test_cancel_is_idempotent_but_refuses_finished_jobs(registry: GenerationRegistry) -> None:
    job = registry.create(REQUEST)
    first = registry.cancel(job.id)
    assert first.status is JobStatus.CANCELLED
    assert registry.cancel(job.id) == first
    done = registry.create(REQUEST)
    registry.start(done.id)
    registry.complete(done.id, RESULT)
    with pytest.raises(AlreadyTerminal):
        registry.cancel(done.id)


def test_list_is_newest_first(registry: GenerationRegistry, clock: FakeClock) -> None:
    ids = []
    for _ in range(3):
        ids.append(registry.create(REQUEST).id)
        clock.now += 1
    assert [job.id for job in registry.list()] == ids[::-1]


def test_delete(registry: GenerationRegistry) -> None:
    job = registry.create(REQUEST)
    assert registry.delete(job.id) is True
    assert registry.delete(job.id) is False
    with pytest.raises(NotFound):
        registry.get(job.id)


def test_cleanup_sweeps_only_terminal_jobs_past_their_ttl(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=1_000, clock=clock)
    pending = registry.create(REQUEST)
    running = registry.create(REQUEST)
    registry.start(running.id)
    finished = {}
    for end in ("complete", "error", "cancelled"):
        job = registry.create(REQUEST)
        registry.start(job.id)
        if end == "complete":
            registry.complete(job.id, RESULT)
        elif end == "error":
            registry.fail(job.id, ERROR)
        else:
            registry.cancel(job.id)
        finished[end] = job.id

    clock.now += 999
    assert registry.cleanup() == 0
    clock.now += 1
    assert registry.cleanup() == 3
    remaining = {job.id for job in registry.list()}
    assert remaining == {pending.id, running.id}
    clock.now += 10**9
    assert registry.cleanup() == 0
    assert {job.id for job in registry.list()} == remaining


def test_ttl_counts_from_the_last_change(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=1_000, clock=clock)
    job = registry.create(REQUEST)
    registry.start(job.id)
    clock.now += 5_000  # a long generation: the TTL starts when it ends, not when created
    registry.complete(job.id, RESULT)
    clock.now += 999
    assert registry.cleanup() == 0
    clock.now += 1
    assert registry.cleanup() == 1


def test_zero_ttl_removes_terminal_jobs_at_the_next_sweep(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=0, clock=clock)
    job = registry.create(REQUEST)
    registry.cancel(job.id)
    assert registry.get(job.id).status is JobStatus.CANCELLED
    assert registry.cleanup() == 1


def test_concurrent_writers_leave_a_consistent_registry() -> None:
    registry = GenerationRegistry(ttl_ms=0)
    jobs = [registry.create(REQUEST) for _ in range(50)]
    for job in jobs:
        registry.start(job.id)
    errors: list[BaseException] = []

    def hammer(job_id: str) -> None:
        try:
            for step in range(200):
                try:
                    registry.report_progress(job_id, progress(step / 2, step))
                except AlreadyTerminal:
                    return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def cancel_all() -> None:
        for job in jobs:
            registry.cancel(job.id)

    threads = [threading.Thread(target=hammer, args=(job.id,)) for job in jobs]
    threads.append(threading.Thread(target=cancel_all))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(job.status is JobStatus.CANCELLED for job in registry.list())
    assert all(job.progress is None for job in registry.list())


class RegistryLifecycle(RuleBasedStateMachine):
    """Random sequences of every registry call never break the lifecycle rules."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.registry = GenerationRegistry(ttl_ms=50, clock=self.clock)
        self.ids: list[str] = []
        self.final: dict[str, tuple[JobStatus, int]] = {}
        self.highest: dict[str, float] = {}

    @rule()
    def create(self) -> None:
        self.ids.append(self.registry.create(REQUEST).id)

    @precondition(lambda self: self.ids)
    @rule(
        data=st.data(), action=st.sampled_from(["start", "progress", "complete", "fail", "cancel"])
    )
    def act(self, data: st.DataObject, action: str) -> None:
        job_id = data.draw(st.sampled_from(self.ids))
        percentage = data.draw(st.floats(0, 99.9))
        calls = {
            "start": lambda: self.registry.start(job_id),
            "progress": lambda: self.registry.report_progress(job_id, progress(percentage)),
            "complete": lambda: self.registry.complete(job_id, RESULT),
            "fail": lambda: self.registry.fail(job_id, ERROR),
            "cancel": lambda: self.registry.cancel(job_id),
        }
        try:
            job = calls[action]()
        except (AlreadyTerminal, NotFound):
            return
        if job.progress is not None:
            assert job.progress.percentage >= self.highest.get(job_id, 0.0)
            self.highest[job_id] = job.progress.percentage

    @rule(ms=st.integers(0, 100))
    def tick_and_sweep(self, ms: int) -> None:
        self.clock.now += ms
        self.registry.cleanup()

    @invariant()
    def terminal_jobs_stay_as_they_ended_until_swept(self) -> None:
        present = {job.id: job for job in self.registry.list()}
        for job_id, (status, updated_at) in self.final.items():
            if job_id in present:
                assert present[job_id].status is status
                assert present[job_id].updated_at == updated_at
        for job_id in self.ids:
            if job_id not in present:
                assert job_id in self.final, "a job that was not terminal disappeared"
        for job in present.values():
            if job.status.is_terminal():
                self.final.setdefault(job.id, (job.status, job.updated_at))
            assert (job.result is not None) == (job.status is JobStatus.COMPLETE)
            assert (job.error is not None) == (job.status is JobStatus.ERROR)


RegistryLifecycle.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
test_registry_lifecycle = RegistryLifecycle.TestCase


def test_each_transition_logs_one_structured_line(
    registry: GenerationRegistry, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="diffusiond.jobs.registry")
    job = registry.create(REQUEST)
    clock.now += 7
    registry.start(job.id)
    registry.report_progress(job.id, progress(10))  # progress is no transition
    clock.now += 30
    registry.fail(job.id, ERROR)
    lines = [r for r in caplog.records if getattr(r, "job", None) == job.id]
    assert [r.status for r in lines] == ["pending", "in_progress", "error"]  # type: ignore[attr-defined]
    assert [r.durationMs for r in lines] == [0, 7, 30]  # type: ignore[attr-defined]
    assert lines[-1].errorCode == "BACKEND_ERROR"  # type: ignore[attr-defined]


def png_result(size: int) -> Result:
    return Result(images=(GeneratedImage(b"x" * size, 1, 64, 64),), time_taken_ms=1)


def test_list_filters_by_status_and_limits(registry: GenerationRegistry) -> None:
    jobs = [registry.create(REQUEST) for _ in range(5)]
    registry.start(jobs[1].id)
    registry.cancel(jobs[2].id)
    registry.start(jobs[3].id)
    registry.complete(jobs[3].id, RESULT)
    newest_first = [job.id for job in reversed(jobs)]
    assert [job.id for job in registry.list()] == newest_first
    assert [job.id for job in registry.list(limit=2)] == newest_first[:2]
    assert [job.id for job in registry.list({JobStatus.PENDING})] == [jobs[4].id, jobs[0].id]
    finished = {JobStatus.COMPLETE, JobStatus.CANCELLED}
    assert [job.id for job in registry.list(finished)] == [jobs[3].id, jobs[2].id]
    assert [job.id for job in registry.list(finished, limit=1)] == [jobs[3].id]
    assert registry.list({JobStatus.ERROR}) == []


def test_results_over_the_byte_budget_evict_the_earliest_completed(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=300_000, clock=clock, max_result_bytes=250)
    jobs = [registry.create(REQUEST) for _ in range(4)]
    failed = registry.create(REQUEST)
    registry.fail(failed.id, ERROR)
    # Completed out of creation order: eviction follows completion order.
    for job_id, size in ((jobs[1].id, 100), (jobs[0].id, 100), (jobs[3].id, 40)):
        registry.start(job_id)
        clock.now += 1
        registry.complete(job_id, png_result(size))
    assert registry.result_bytes() == 240
    registry.start(jobs[2].id)
    registry.complete(jobs[2].id, png_result(100))  # 340 > 250: jobs[1] goes first
    assert registry.result_bytes() == 240
    with pytest.raises(NotFound):
        registry.get(jobs[1].id)
    kept = {job.id for job in registry.list()}
    assert kept == {jobs[0].id, jobs[2].id, jobs[3].id, failed.id}  # failed holds no bytes


def test_the_newest_result_is_kept_even_alone_over_the_budget(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=300_000, clock=clock, max_result_bytes=50)
    first, second = registry.create(REQUEST), registry.create(REQUEST)
    for job in (first, second):
        registry.start(job.id)
        registry.complete(job.id, png_result(80))
    assert [job.id for job in registry.list()] == [second.id]
    assert registry.result_bytes() == 80


def test_expiry_and_delete_release_result_bytes(
    registry: GenerationRegistry, clock: FakeClock
) -> None:
    first, second = registry.create(REQUEST), registry.create(REQUEST)
    for job in (first, second):
        registry.start(job.id)
        registry.complete(job.id, png_result(10))
    assert registry.result_bytes() == 20
    registry.delete(first.id)
    assert registry.result_bytes() == 10
    clock.now += 300_000
    assert registry.cleanup() == 1
    assert registry.result_bytes() == 0


def test_recover_ends_running_jobs_and_returns_pending(registry: GenerationRegistry) -> None:
    running, waiting, done = (registry.create(REQUEST) for _ in range(3))
    registry.start(running.id)
    registry.start(done.id)
    registry.complete(done.id, RESULT)
    assert [job.id for job in registry.recover()] == [waiting.id]
    ended = registry.get(running.id)
    assert ended.status is JobStatus.ERROR
    assert ended.error is not None
    assert ended.error.code is ErrorCode.SERVER_RESTARTED
    assert registry.get(done.id).status is JobStatus.COMPLETE


# -- bounded memory (issue 14, item 3) ---------------------------------------------------


def test_create_and_cancel_in_a_loop_keeps_at_most_max_jobs(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=300_000, clock=clock, max_jobs=50)
    kept = [registry.create(REQUEST) for _ in range(3)]  # pending: never dropped
    for _ in range(500):
        job = registry.create(REQUEST)
        registry.cancel(job.id)
        clock.now += 1
        assert len(registry.list()) <= 50
    remaining = {job.id for job in registry.list()}
    assert {job.id for job in kept} <= remaining
    assert job.id in remaining  # the newest terminal job is still there


def test_the_oldest_terminal_jobs_go_first_never_running_ones(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=300_000, clock=clock, max_jobs=3)
    running = registry.create(REQUEST)
    registry.start(running.id)
    done = registry.create(REQUEST)
    registry.start(done.id)
    registry.complete(done.id, RESULT)
    cancelled = registry.create(REQUEST)
    registry.cancel(cancelled.id)
    newest = registry.create(REQUEST)
    assert not registry.exists(done.id)  # ended first, so dropped first
    assert [job.id for job in registry.list()] == [newest.id, cancelled.id, running.id]
    assert registry.result_bytes() == 0  # a dropped result no longer counts


def test_more_live_jobs_than_the_bound_are_all_kept(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=300_000, clock=clock, max_jobs=2)
    live = [registry.create(REQUEST) for _ in range(4)]
    registry.start(live[0].id)
    assert {job.id for job in registry.list()} == {job.id for job in live}


class LockProbe:
    """A status filter that notes, at each membership test, whether the lock is held."""

    def __init__(self, lock: object, statuses: set[JobStatus]) -> None:
        self._lock = lock
        self._statuses = statuses
        self.held_during_filter: list[bool] = []

    def __contains__(self, status: object) -> bool:
        self.held_during_filter.append(self._lock.locked())  # type: ignore[attr-defined]
        return status in self._statuses

    def __iter__(self) -> Iterator[JobStatus]:
        return iter(self._statuses)

    def __len__(self) -> int:
        return len(self._statuses)


def test_list_filters_outside_the_registry_lock(registry: GenerationRegistry) -> None:
    jobs = [registry.create(REQUEST) for _ in range(200)]
    for job in jobs[::2]:
        registry.cancel(job.id)
    probe = LockProbe(registry._lock, {JobStatus.PENDING})
    found = registry.list(probe, limit=10)
    assert [job.id for job in found] == [job.id for job in jobs[1::2][::-1][:10]]
    assert probe.held_during_filter  # the probe ran...
    assert not any(probe.held_during_filter)  # ...and never while GETs had to wait


def test_the_sweep_releases_the_lock_between_small_batches(clock: FakeClock) -> None:
    registry = GenerationRegistry(ttl_ms=1_000, clock=clock, max_jobs=10_000)
    for _ in range(1_000):
        registry.cancel(registry.create(REQUEST).id)
    clock.now += 1_000
    survivor = registry.create(REQUEST)
    real_forget = registry._forget
    held_since_release: list[int] = []
    deleted = 0

    def forget(job_id: str) -> bool:
        nonlocal deleted
        deleted += 1
        held_since_release.append(deleted)
        return real_forget(job_id)

    registry._forget = forget  # type: ignore[method-assign]
    real_lock = registry._lock

    class CountingLock:
        def __enter__(self) -> None:
            nonlocal deleted
            real_lock.acquire()
            deleted = 0

        def __exit__(self, *_: object) -> None:
            real_lock.release()

        def locked(self) -> bool:
            return real_lock.locked()

    registry._lock = CountingLock()  # type: ignore[assignment]
    assert registry.cleanup() == 1_000
    assert max(held_since_release) <= 100  # no lock hold deletes more than one batch
    assert [job.id for job in registry.list()] == [survivor.id]


# -- the store and memory agree (issue 14, item 6) ---------------------------------------


class FailingStore(MemoryStore):
    """A store whose writes fail while `failing` is set, keeping nothing of a failed one."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def put(self, job: Job) -> None:
        if self.failing:
            raise StoreError("the job store could not save the change: disk I/O error")
        super().put(job)


def test_a_failed_write_in_create_registers_nothing() -> None:
    store = FailingStore()
    registry = GenerationRegistry(ttl_ms=300_000, store=store)
    store.failing = True
    with pytest.raises(StoreError, match="could not save"):
        registry.create(REQUEST)
    assert registry.list() == []
    assert len(store) == 0


def test_a_failed_write_in_complete_ends_the_job_as_an_error_if_it_can() -> None:
    store = FailingStore()
    registry = GenerationRegistry(ttl_ms=300_000, store=store, max_result_bytes=10)
    job = registry.create(REQUEST)
    registry.start(job.id)
    writes = 0
    real_put = MemoryStore.put

    def fail_once(self: FailingStore, one: Job) -> None:
        nonlocal writes
        writes += 1
        if writes == 1:
            raise StoreError("the job store could not save the change: disk full")
        real_put(self, one)

    store.put = fail_once.__get__(store)  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        registry.complete(job.id, RESULT)
    ended = registry.get(job.id)
    assert ended.status is JobStatus.ERROR
    assert ended.error is not None
    assert ended.error.code is ErrorCode.IO_ERROR
    assert ended.result is None
    assert store.get(job.id) == ended  # what the store holds is what GET says
    assert registry.result_bytes() == 0


def test_when_no_write_succeeds_memory_keeps_what_the_store_has() -> None:
    store = FailingStore()
    registry = GenerationRegistry(ttl_ms=300_000, store=store)
    job = registry.create(REQUEST)
    running = registry.start(job.id)
    store.failing = True
    with pytest.raises(StoreError):
        registry.complete(job.id, RESULT)
    assert registry.get(job.id) == running == store.get(job.id)
    assert registry.result_bytes() == 0
    store.failing = False
    assert registry.fail(job.id, ERROR).status is JobStatus.ERROR  # it can still end


# -- the sweeper survives (issue 14, item 6) ---------------------------------------------


def test_the_sweeper_survives_an_interval_past_what_event_wait_accepts(
    registry: GenerationRegistry,
) -> None:
    sweeper = TtlSweeper(registry, 10**16)  # ms: far beyond threading.TIMEOUT_MAX
    sweeper.start()
    try:
        sweeper._thread.join(timeout=0.5)  # a dead sweeper ends at once; a live one waits
        assert sweeper._thread.is_alive()
    finally:
        sweeper.stop()
    assert not sweeper._thread.is_alive()


def test_the_sweeper_logs_a_failed_sweep_and_sweeps_again(
    registry: GenerationRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    swept_twice = threading.Event()

    def cleanup() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        swept_twice.set()
        return 0

    registry.cleanup = cleanup  # type: ignore[method-assign]
    sweeper = TtlSweeper(registry, 1)
    sweeper.start()
    try:
        assert swept_twice.wait(10)
    finally:
        sweeper.stop()
    assert "ttl sweep failed" in caplog.text
