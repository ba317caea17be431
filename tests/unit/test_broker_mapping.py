"""The one mapping from SAQ's job records to diffusiond's jobs (broker/mapping.py)."""

from __future__ import annotations

from saq.job import Job as SaqJob
from saq.job import Status

from diffusiond.broker.mapping import (
    CANCELLED_OUTCOME,
    complete_outcome,
    error_outcome,
    progress_to_json,
    request_to_json,
    to_job,
)
from diffusiond.broker.queue import SWEPT_MARK, JobOptions
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    JobError,
    JobStatus,
    LoraWeight,
    Preview,
    Progress,
    Result,
    Stage,
    StageTimings,
)

REQUEST = GenerationRequest(
    prompt="a boat", width=64, height=64, steps=3, seed=5, count=2, model="other",
    loras=(LoraWeight("detail", 0.5),), scheduler="exponential", clip_skip=3,
)  # fmt: skip


def saq_job(status: Status, **fields: object) -> SaqJob:
    job = SaqJob(
        function="generate",
        kwargs={"request": request_to_json(REQUEST)},
        key="gen_1_abc",
        queued=1000,
        status=status,
    )
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def test_waiting_jobs_are_pending_with_their_request() -> None:
    for status in (Status.NEW, Status.QUEUED):
        job = to_job(saq_job(status), None)
        assert job.status is JobStatus.PENDING
        assert job.request == REQUEST
        assert (job.id, job.created_at, job.updated_at) == ("gen_1_abc", 1000, 1000)


def test_running_jobs_carry_the_progress_the_worker_wrote() -> None:
    progress = Progress(
        Stage.DIFFUSION, 2, 3, 40.5, 1, 2, eta_ms=99, preview=Preview(b"j", 8, 8, 2)
    )
    meta = {"v": 4, "progress": progress_to_json(progress)}
    for status in (Status.ACTIVE, Status.ABORTING):
        job = to_job(saq_job(status, started=1100, touched=1200, meta=meta), None)
        assert job.status is JobStatus.IN_PROGRESS
        assert job.progress == progress
        assert (job.started_at, job.updated_at, job.version) == (1100, 1200, 4)
    fresh = to_job(saq_job(Status.ACTIVE, started=1100), None)
    assert fresh.progress is not None
    assert (fresh.progress.stage, fresh.progress.percentage) == (Stage.LOADING, 0.0)
    assert fresh.progress.total_images == 2


def test_outcomes_of_finished_jobs() -> None:
    images = (GeneratedImage(b"\x89PNG1", 5, 64, 64), GeneratedImage(b"\x89PNG2", 6, 64, 64))
    result = Result(images, 1234, timings=StageTimings(1, 2, 3, 4))
    done = to_job(saq_job(Status.COMPLETE, result=complete_outcome(result), meta={"v": 7}), None)
    assert done.status is JobStatus.COMPLETE
    assert done.result == result
    assert done.version == 8  # above every progress version: a new event for the end

    error = JobError("Generation failed on image 2 of 2: boom", ErrorCode.BACKEND_ERROR)
    failed = to_job(saq_job(Status.COMPLETE, result=error_outcome(error)), None)
    assert (failed.status, failed.error) == (JobStatus.ERROR, error)

    stopped = to_job(saq_job(Status.COMPLETE, result=CANCELLED_OUTCOME), None)
    assert stopped.status is JobStatus.CANCELLED

    broken = to_job(saq_job(Status.FAILED, error="Traceback ..."), None)
    assert broken.status is JobStatus.ERROR
    assert broken.error is not None
    assert broken.error.code is ErrorCode.UNKNOWN_ERROR
    assert "Traceback" not in broken.error.message


def test_a_swept_job_is_worker_lost() -> None:
    lost = to_job(saq_job(Status.ABORTED, error=SWEPT_MARK, started=1100), None)
    assert lost.status is JobStatus.ERROR
    assert lost.error is not None
    assert lost.error.code is ErrorCode.WORKER_LOST


def test_the_cancel_mark_wins_over_every_saq_status() -> None:
    for status in Status:
        job = to_job(saq_job(status, touched=1200, result=CANCELLED_OUTCOME), 1500)
        assert job.status is JobStatus.CANCELLED
        assert job.updated_at == 1500
        assert job.progress is None
        assert job.result is None


def test_job_options_are_deliberate() -> None:
    options = JobOptions.from_settings(result_ttl_ms=300_000, heartbeat_s=10)
    assert (options.ttl_s, options.heartbeat_s, options.timeout_s, options.retries) == (
        300,
        10,
        0,
        1,
    )
    # IMAGE_RESULT_TTL_MS=0 means "gone soon", never SAQ's 0 ("kept forever").
    assert JobOptions.from_settings(result_ttl_ms=0, heartbeat_s=10).ttl_s == 1
    assert JobOptions.from_settings(result_ttl_ms=1500, heartbeat_s=10).ttl_s == 2
    assert options.cancel_mark_ttl_s > options.ttl_s
