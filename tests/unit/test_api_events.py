"""The event parts on their own: the pacing rule on a fake clock, wake-ups, JobChanged."""

from __future__ import annotations

import asyncio

import pytest

from diffusiond.api.events import EventPacer, JobEvents
from diffusiond.jobs.models import GenerationRequest, JobChanged, Progress, Stage
from diffusiond.jobs.registry import GenerationRegistry


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_event_goes_at_once_then_one_per_interval() -> None:
    clock = FakeClock()
    pacer = EventPacer(0.1, clock)
    assert pacer.delay_s() == 0.0
    pacer.sent()
    assert pacer.delay_s() == pytest.approx(0.1)
    clock.now += 0.04
    assert pacer.delay_s() == pytest.approx(0.06)
    clock.now += 0.06
    assert pacer.delay_s() == 0.0
    pacer.sent()
    clock.now += 0.5  # a long quiet time earns no burst: still one event, then the interval
    assert pacer.delay_s() == 0.0
    pacer.sent()
    assert pacer.delay_s() == pytest.approx(0.1)


def test_a_zero_interval_never_holds_back() -> None:
    pacer = EventPacer(0.0, FakeClock())
    pacer.sent()
    assert pacer.delay_s() == 0.0


def test_one_event_per_interval_over_a_run_of_changes() -> None:
    clock = FakeClock()
    pacer = EventPacer(1 / 8, clock)  # binary fractions: the arithmetic is exact
    sent_at = []
    for tick in range(1024):  # a change every 1/1024 s for one second
        clock.now = 100 + tick / 1024
        if pacer.delay_s() == 0.0:
            pacer.sent()
            sent_at.append(tick)
    assert sent_at == [128 * n for n in range(8)]


def test_changes_wake_the_followers_they_concern() -> None:
    async def woken(change: JobChanged) -> tuple[bool, bool]:
        events = JobEvents()
        with events.subscribe("gen_a") as a, events.subscribe("gen_b") as b:
            events.on_change(change)
            await asyncio.sleep(0)  # let the scheduled wake-ups run
            return a.is_set(), b.is_set()

    assert asyncio.run(woken(JobChanged("gen_a"))) == (True, False)
    assert asyncio.run(woken(JobChanged("gen_a", deleted=True))) == (True, False)
    # A status change may move every queue position: everyone looks again.
    assert asyncio.run(woken(JobChanged("gen_a", status_changed=True))) == (True, True)


def test_the_registry_says_what_changed() -> None:
    registry = GenerationRegistry(ttl_ms=0)
    heard: list[JobChanged] = []
    registry.add_listener(heard.append)
    job = registry.create(GenerationRequest(prompt="p"))
    registry.start(job.id)
    registry.report_progress(job.id, Progress(Stage.DIFFUSION, 1, 2, 50.0, 1, 1))
    registry.cancel(job.id)
    registry.cleanup()
    assert heard == [
        JobChanged(job.id, status_changed=True),
        JobChanged(job.id),
        JobChanged(job.id, status_changed=True),
        JobChanged(job.id, deleted=True),
    ]
