from __future__ import annotations

import dataclasses

from diffusiond.api.app import _TerminalBodyCache
from diffusiond.jobs.models import (
    GeneratedImage,
    GenerationRequest,
    Job,
    JobStatus,
    Progress,
    Result,
    Stage,
)


def job(job_id: str, status: JobStatus) -> Job:
    result = None
    if status is JobStatus.COMPLETE:
        result = Result((GeneratedImage(png=b"\x89PNG" * 1000, seed=1, width=64, height=64),), 9)
    progress = (
        Progress(Stage.DIFFUSION, 1, 2, 40.0, 1, 1) if status is JobStatus.IN_PROGRESS else None
    )
    return Job(
        id=job_id,
        request=GenerationRequest(prompt="p"),
        status=status,
        created_at=1,
        updated_at=2,
        result=result,
        progress=progress,
    )


def test_a_complete_job_is_rendered_once_and_served_from_those_bytes() -> None:
    cache = _TerminalBodyCache(size=4)
    done = job("gen_1_a", JobStatus.COMPLETE)
    first = cache.render(done)
    assert cache.render(done) is first  # the same bytes object: no base64, no JSON again


def test_running_jobs_are_rendered_once_per_change() -> None:
    cache = _TerminalBodyCache(size=4)
    running = job("gen_1_a", JobStatus.IN_PROGRESS)
    before = cache.render(running)
    assert cache.render(running) is before  # many pollers, one rendering per version
    assert running.progress is not None
    later = dataclasses.replace(  # what the registry makes of a progress report
        running,
        progress=dataclasses.replace(running.progress, current_step=2),
        version=running.version + 1,
    )
    assert cache.render(later) != before
    waiting = job("gen_1_b", JobStatus.PENDING)
    assert b'"queuePosition":2' in cache.render(waiting, 2)
    assert b'"queuePosition":1' in cache.render(waiting, 1)  # the position alone moved


def test_the_cache_is_bounded_and_keeps_the_recently_used() -> None:
    cache = _TerminalBodyCache(size=2)
    a, b, c = (job(f"gen_1_{n}", JobStatus.COMPLETE) for n in "abc")
    body_a = cache.render(a)
    cache.render(b)
    assert cache.render(a) is body_a  # a is now the most recently used
    cache.render(c)  # evicts b
    assert cache.render(a) is body_a
    assert len(cache._bodies) == 2
    assert set(cache._bodies) == {a.id, c.id}
