"""RenderedBodies: one rendering per change, bounded by bytes, dropped with the job."""

from __future__ import annotations

import dataclasses

from diffusiond.api.bodies import RenderedBodies
from diffusiond.jobs.models import (
    GeneratedImage,
    GenerationRequest,
    Job,
    JobChanged,
    JobStatus,
    Progress,
    Result,
    Stage,
)
from diffusiond.jobs.registry import GenerationRegistry


def job(job_id: str, status: JobStatus, png_bytes: int = 4000) -> Job:
    result = None
    if status is JobStatus.COMPLETE:
        image = GeneratedImage(png=b"\x89PNG" * (png_bytes // 4), seed=1, width=64, height=64)
        result = Result((image,), 9)
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
    bodies = RenderedBodies()
    done = job("gen_1_a", JobStatus.COMPLETE)
    first = bodies.render(done)
    assert bodies.render(done) is first  # the same bytes object: no base64, no JSON again


def test_running_jobs_are_rendered_once_per_change() -> None:
    bodies = RenderedBodies()
    running = job("gen_1_a", JobStatus.IN_PROGRESS)
    before = bodies.render(running)
    assert bodies.render(running) is before  # many pollers, one rendering per version
    assert running.progress is not None
    later = dataclasses.replace(  # what the registry makes of a progress report
        running,
        progress=dataclasses.replace(running.progress, current_step=2),
        version=running.version + 1,
    )
    assert bodies.render(later) != before
    waiting = job("gen_1_b", JobStatus.PENDING)
    assert b'"queuePosition":2' in bodies.render(waiting, 2)
    assert b'"queuePosition":1' in bodies.render(waiting, 1)  # the position alone moved


def test_the_bodies_are_bounded_by_bytes_and_keep_the_recently_read() -> None:
    one = len(RenderedBodies().render(job("gen_1_x", JobStatus.COMPLETE)))
    bodies = RenderedBodies(max_bytes=2 * one + one // 2)  # room for two bodies, not three
    a, b, c = (job(f"gen_1_{n}", JobStatus.COMPLETE) for n in "abc")
    body_a = bodies.render(a)
    bodies.render(b)
    assert bodies.render(a) is body_a  # a is now the most recently read
    bodies.render(c)  # b goes
    assert bodies.render(a) is body_a
    assert a.id in bodies
    assert c.id in bodies
    assert b.id not in bodies
    assert bodies.total_bytes == 2 * one


def test_a_body_over_the_bound_alone_is_still_kept_as_the_newest() -> None:
    bodies = RenderedBodies(max_bytes=100)
    big = job("gen_1_a", JobStatus.COMPLETE, png_bytes=10_000)
    first = bodies.render(big)
    assert len(first) > 100
    assert bodies.render(big) is first
    bodies.render(job("gen_1_b", JobStatus.COMPLETE, png_bytes=10_000))
    assert "gen_1_a" not in bodies
    assert "gen_1_b" in bodies


def test_a_deleted_job_takes_its_body_with_it() -> None:
    bodies = RenderedBodies()
    kept, gone = job("gen_1_a", JobStatus.COMPLETE), job("gen_1_b", JobStatus.COMPLETE)
    bodies.render(kept)
    bodies.render(gone)
    bodies.on_change(JobChanged(gone.id, status_changed=True))  # a change is not a deletion
    assert gone.id in bodies
    bodies.on_change(JobChanged(gone.id, deleted=True))
    assert gone.id not in bodies
    assert kept.id in bodies
    assert bodies.total_bytes == len(bodies.render(kept))


def test_swept_and_evicted_jobs_leave_the_bodies() -> None:
    now = [1_000]
    registry = GenerationRegistry(ttl_ms=10, clock=lambda: now[0], max_result_bytes=5)
    bodies = RenderedBodies()
    registry.add_listener(bodies.on_change)
    image = GeneratedImage(png=b"12345", seed=1, width=1, height=1)
    first, second, third = (registry.create(GenerationRequest(prompt="p")) for _ in range(3))
    for created in (first, second):
        registry.start(created.id)
        bodies.render(registry.complete(created.id, Result((image,), 1)))
    assert first.id not in bodies  # evicted: the results were over max_result_bytes
    assert second.id in bodies
    bodies.render(registry.cancel(third.id))
    now[0] += 10
    assert registry.cleanup() == 2  # the TTL sweep deletes second and third
    assert second.id not in bodies
    assert third.id not in bodies
    assert bodies.total_bytes == 0
