"""The engine's threads, admission and cancel, one layer above a fake backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from PIL.Image import Image

from diffusiond.engine.engine import Engine
from diffusiond.errors import AlreadyTerminal, ServerBusy, ServerNotReady
from diffusiond.jobs.models import ErrorCode, GenerationRequest, Job, JobStatus
from diffusiond.jobs.registry import GenerationRegistry
from tests.support.fakes import FakeBackend

REQUEST = GenerationRequest(prompt="x", width=64, height=64, steps=3, seed=1)


class Watcher:
    """Lets a test wait for a job's final state without sleeping on a timer."""

    def __init__(self, registry: GenerationRegistry) -> None:
        self.registry = registry
        self.changed = threading.Condition()
        original = registry._apply

        def apply(*args: object, **kwargs: object) -> Job:
            job = original(*args, **kwargs)  # type: ignore[arg-type]
            with self.changed:
                self.changed.notify_all()
            return job

        registry._apply = apply  # type: ignore[method-assign]

    def wait_terminal(self, job_id: str, timeout_s: float = 10) -> Job:
        def ended() -> bool:
            return self.registry.get(job_id).status.is_terminal()

        with self.changed:
            ok = self.changed.wait_for(ended, timeout_s)
        assert ok, self.registry.get(job_id)
        return self.registry.get(job_id)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def registry() -> GenerationRegistry:
    return GenerationRegistry(ttl_ms=60_000)


@pytest.fixture
def engine(registry: GenerationRegistry, backend: FakeBackend) -> Iterator[Engine]:
    engine = Engine(registry, backend, max_concurrent=1, encode=lambda image, text: b"png")
    engine.start()
    engine.load_model()
    yield engine
    backend.hold.set()
    engine.shutdown()


def test_a_job_runs_to_complete(engine: Engine, registry: GenerationRegistry) -> None:
    watcher = Watcher(registry)
    job = engine.submit(REQUEST)
    final = watcher.wait_terminal(job.id)
    assert final.status is JobStatus.COMPLETE
    assert final.result is not None
    assert [image.seed for image in final.result.images] == [1]
    assert engine.stats().admitted == 0


def test_the_slot_is_free_when_the_job_shows_as_ended(
    engine: Engine, registry: GenerationRegistry
) -> None:
    """A client that submits the moment it sees its job complete must not be refused."""
    admitted_when_ended: list[int] = []
    original = registry.complete

    def complete(job_id: str, result: Any) -> Job:
        admitted_when_ended.append(engine.stats().admitted)
        return original(job_id, result)

    registry.complete = complete  # type: ignore[method-assign]
    watcher = Watcher(registry)
    job = engine.submit(REQUEST)
    assert watcher.wait_terminal(job.id).status is JobStatus.COMPLETE
    assert admitted_when_ended == [0]


def test_not_ready_until_loaded(registry: GenerationRegistry, backend: FakeBackend) -> None:
    engine = Engine(registry, backend, max_concurrent=1)
    with pytest.raises(ServerNotReady):
        engine.submit(REQUEST)
    assert registry.list() == []


def test_busy_when_every_worker_is_taken(
    engine: Engine, backend: FakeBackend, registry: GenerationRegistry
) -> None:
    backend.holding = True
    first = engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    with pytest.raises(ServerBusy) as caught:
        engine.submit(REQUEST)
    assert 1 <= caught.value.retry_after_s <= 60
    assert [job.id for job in registry.list()] == [first.id]  # the refused job left no trace
    backend.hold.set()


def test_cancel_running_stops_at_next_step_and_frees_the_slot(
    engine: Engine, backend: FakeBackend, registry: GenerationRegistry
) -> None:
    watcher = Watcher(registry)
    backend.holding = True
    running = engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    assert engine.cancel(running.id).status is JobStatus.CANCELLED
    assert engine.stats().admitted == 0
    backend.holding = False
    queued = engine.submit(REQUEST)  # admitted while the cancelled job ends its step
    backend.hold.set()
    assert watcher.wait_terminal(queued.id).status is JobStatus.COMPLETE
    assert backend.stopped_at == 1
    assert registry.get(running.id).status is JobStatus.CANCELLED
    assert registry.get(running.id).progress is None


def test_cancel_pending_never_runs(
    engine: Engine, backend: FakeBackend, registry: GenerationRegistry
) -> None:
    watcher = Watcher(registry)
    backend.holding = True
    running = engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    engine.cancel(running.id)
    pending = engine.submit(GenerationRequest(prompt="never", seed=99))
    assert registry.get(pending.id).status is JobStatus.PENDING
    engine.cancel(pending.id)
    backend.holding = False
    backend.hold.set()
    probe = engine.submit(REQUEST)
    watcher.wait_terminal(probe.id)
    assert 99 not in [spec.seed for spec in backend.drawn]
    assert registry.get(pending.id).status is JobStatus.CANCELLED


def test_cancel_of_a_finished_job_is_refused(engine: Engine, registry: GenerationRegistry) -> None:
    watcher = Watcher(registry)
    job = engine.submit(REQUEST)
    watcher.wait_terminal(job.id)
    with pytest.raises(AlreadyTerminal):
        engine.cancel(job.id)


def test_a_backend_failure_ends_the_job_and_the_worker_goes_on(
    registry: GenerationRegistry,
) -> None:
    backend = FakeBackend(fail_on_seed=11)
    engine = Engine(registry, backend, max_concurrent=1, encode=lambda image, text: b"png")
    engine.start()
    engine.load_model()
    watcher = Watcher(registry)
    try:
        failed = engine.submit(GenerationRequest(prompt="x", seed=10, count=3, steps=2))
        final = watcher.wait_terminal(failed.id)
        assert final.status is JobStatus.ERROR
        assert final.error is not None
        assert final.error.code is ErrorCode.BACKEND_ERROR
        assert final.error.message.startswith("Generation failed on image 2 of 3")
        assert final.result is None
        after = engine.submit(REQUEST)
        assert watcher.wait_terminal(after.id).status is JobStatus.COMPLETE
    finally:
        engine.shutdown()


def test_a_worker_thread_that_dies_ends_its_job_and_is_replaced(
    registry: GenerationRegistry,
) -> None:
    deaths = [SystemExit("a worker thread's death")]

    def broken_encoder(_image: object, _text: object) -> bytes:
        if deaths:
            raise deaths.pop()
        return b"png"

    engine = Engine(registry, FakeBackend(), max_concurrent=1, encode=broken_encoder)
    engine.start()
    engine.load_model()
    watcher = Watcher(registry)
    try:
        job = engine.submit(REQUEST)
        final = watcher.wait_terminal(job.id)
        assert final.status is JobStatus.ERROR
        assert final.error is not None
        assert final.error.code is ErrorCode.UNKNOWN_ERROR
        # The thread that died was replaced: the next job runs.
        after = engine.submit(REQUEST)
        assert watcher.wait_terminal(after.id).status is JobStatus.COMPLETE
    finally:
        engine.shutdown()


def test_a_job_past_the_time_limit_ends_as_timeout(registry: GenerationRegistry) -> None:
    backend = FakeBackend(step_seconds=0.01)
    engine = Engine(registry, backend, max_concurrent=1, timeout_ms=50, encode=lambda i, t: b"png")
    engine.start()
    engine.load_model()
    watcher = Watcher(registry)
    try:
        slow = engine.submit(GenerationRequest(prompt="x", steps=150, seed=1))
        final = watcher.wait_terminal(slow.id)
        assert final.status is JobStatus.ERROR
        assert final.error is not None
        assert final.error.code is ErrorCode.TIMEOUT_ERROR
        assert "timed out after 50 ms" in final.error.message
        quick = engine.submit(GenerationRequest(prompt="x", steps=1, seed=2))
        assert watcher.wait_terminal(quick.id).status is JobStatus.COMPLETE
    finally:
        engine.shutdown()


def test_a_failed_load_is_remembered(registry: GenerationRegistry) -> None:
    class BrokenLoad(FakeBackend):
        def load(self) -> None:
            raise RuntimeError("weights are corrupt")

    engine = Engine(registry, BrokenLoad(), max_concurrent=1)
    with pytest.raises(RuntimeError):
        engine.load_model()
    assert engine.ready is False
    assert engine.load_error == "weights are corrupt"
    with pytest.raises(ServerNotReady, match="weights are corrupt"):
        engine.submit(REQUEST)


def test_shutdown_cancels_what_runs(registry: GenerationRegistry, backend: FakeBackend) -> None:
    engine = Engine(registry, backend, max_concurrent=1, encode=lambda image, text: b"png")
    engine.start()
    engine.load_model()
    watcher = Watcher(registry)
    backend.holding = True
    job = engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    # The job is still held at step 1 while shutdown() runs: only shutdown can end it.
    stopper = threading.Thread(target=engine.shutdown)
    stopper.start()
    assert watcher.wait_terminal(job.id).status is JobStatus.CANCELLED
    backend.hold.set()  # the step ends; the generation must see its cancel token
    stopper.join(10)
    assert not stopper.is_alive()
    assert backend.stopped_at == 1  # stopped at its next step, not drawn to the end
    assert backend.drawn == []


@pytest.fixture
def queued_engine(registry: GenerationRegistry, backend: FakeBackend) -> Iterator[Engine]:
    engine = Engine(registry, backend, max_concurrent=1, max_queue=2, encode=lambda i, t: b"png")
    engine.start()
    engine.load_model()
    yield engine
    backend.hold.set()
    engine.shutdown()


def test_a_bounded_queue_admits_in_order_with_positions(
    queued_engine: Engine, backend: FakeBackend, registry: GenerationRegistry
) -> None:
    watcher = Watcher(registry)
    backend.holding = True
    running = queued_engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    first = queued_engine.submit(GenerationRequest(prompt="a", seed=21, steps=1))
    second = queued_engine.submit(GenerationRequest(prompt="b", seed=22, steps=1))
    with pytest.raises(ServerBusy, match="queue place"):
        queued_engine.submit(REQUEST)
    assert queued_engine.queue_position(running.id) is None
    assert [queued_engine.queue_position(job.id) for job in (first, second)] == [1, 2]
    queued_engine.cancel(first.id)
    assert queued_engine.queue_position(second.id) == 1
    third = queued_engine.submit(GenerationRequest(prompt="c", seed=23, steps=1))
    assert queued_engine.queue_position(third.id) == 2
    backend.holding = False
    backend.hold.set()
    assert watcher.wait_terminal(third.id).status is JobStatus.COMPLETE
    assert [spec.seed for spec in backend.drawn] == [1, 22, 23]  # arrival order, no "a"


def test_drain_waits_for_the_running_job_and_keeps_the_queue(
    queued_engine: Engine, backend: FakeBackend, registry: GenerationRegistry
) -> None:
    backend.holding = True
    running = queued_engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    waiting = queued_engine.submit(GenerationRequest(prompt="later", seed=5, steps=1))
    finisher = threading.Timer(0.2, backend.hold.set)  # the job ends well within the grace
    finisher.start()
    assert queued_engine.drain(grace_s=30) is True
    assert registry.get(running.id).status is JobStatus.COMPLETE
    with pytest.raises(ServerBusy, match="shutting down"):
        queued_engine.submit(REQUEST)
    queued_engine.shutdown(keep_pending=True)
    assert registry.get(waiting.id).status is JobStatus.PENDING  # for a restart to run
    assert 5 not in [spec.seed for spec in backend.drawn]


def test_drain_past_the_grace_cancels(
    queued_engine: Engine, backend: FakeBackend, registry: GenerationRegistry
) -> None:
    backend.holding = True
    running = queued_engine.submit(REQUEST)
    assert backend.at_step_one.wait(10)
    waiting = queued_engine.submit(REQUEST)
    threading.Timer(0.3, backend.hold.set).start()  # the step ends after the grace
    assert queued_engine.drain(grace_s=0.05) is False
    assert registry.get(running.id).status is JobStatus.CANCELLED
    assert queued_engine.stats().running == 0
    queued_engine.shutdown()  # a memory store: what waited is cancelled, not left open
    assert registry.get(waiting.id).status is JobStatus.CANCELLED


def test_resumed_jobs_run_first(registry: GenerationRegistry, backend: FakeBackend) -> None:
    engine = Engine(registry, backend, max_concurrent=1, max_queue=2, encode=lambda i, t: b"png")
    engine.start()
    watcher = Watcher(registry)
    try:
        earlier = [
            registry.create(GenerationRequest(prompt="old", seed=n, steps=1)) for n in (7, 8)
        ]
        engine.resume(earlier)  # as the server does: before the model is loaded
        assert [engine.queue_position(job.id) for job in earlier] == [1, 2]
        engine.load_model()
        # The first POST once the engine is ready: it must not jump ahead of the old jobs.
        new = engine.submit(GenerationRequest(prompt="new", seed=9, steps=1))
        assert watcher.wait_terminal(new.id).status is JobStatus.COMPLETE
        assert [spec.seed for spec in backend.drawn] == [7, 8, 9]
    finally:
        engine.shutdown()


def test_no_job_starts_before_the_model_is_loaded(registry: GenerationRegistry) -> None:
    class SlowLoad(FakeBackend):
        """Its load lasts until a generation starts, or 0.5 s: a job that started during the
        load is caught in the act (a bounded wait: what is tested is that nothing comes)."""

        def __init__(self) -> None:
            super().__init__()
            self.loading = False
            self.generating = threading.Event()
            self.generated_while_loading = False

        def load(self) -> None:
            self.loading = True
            self.generating.wait(0.5)
            self.loading = False

        def generate(self, *args: Any, **kwargs: Any) -> Image:
            self.generated_while_loading |= self.loading
            self.generating.set()
            return super().generate(*args, **kwargs)

    backend = SlowLoad()
    engine = Engine(registry, backend, max_concurrent=2, encode=lambda i, t: b"png")
    engine.start()
    watcher = Watcher(registry)
    try:
        restored = registry.create(GenerationRequest(prompt="old", seed=3, steps=1))
        engine.resume([restored])
        engine.load_model()
        assert watcher.wait_terminal(restored.id).status is JobStatus.COMPLETE
        assert backend.generated_while_loading is False
    finally:
        engine.shutdown()


def test_resume_after_the_load_is_refused(engine: Engine, registry: GenerationRegistry) -> None:
    late = registry.create(GenerationRequest(prompt="old", seed=3, steps=1))
    with pytest.raises(RuntimeError, match="before load_model"):
        engine.resume([late])
