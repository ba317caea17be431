"""Between SAQ's job records and diffusiond's `Job`: the one state mapping, and the JSON
forms of a request, a progress report and a result that cross Redis.

| SAQ status          | diffusiond status                                          |
|---------------------|------------------------------------------------------------|
| new, queued         | pending                                                    |
| active, aborting    | in_progress                                                |
| complete            | the outcome the worker returned: complete, error, cancelled |
| failed              | error UNKNOWN_ERROR (the job function itself broke)        |
| aborted             | error WORKER_LOST (swept after its heartbeat lapsed)       |

A cancel mark (set by DELETE, only while the job was not terminal) wins over all of these:
once a DELETE has answered "cancelled", the job reads cancelled for the rest of its life.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from saq.job import Job as SaqJob
from saq.job import Status

from diffusiond.jobs.edit_json import edit_from_json, edit_to_json
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    Job,
    JobError,
    JobStatus,
    LoraWeight,
    Preview,
    Progress,
    Result,
    Stage,
    StageTimings,
)

Json = dict[str, Any]

WORKER_LOST_MESSAGE = (
    "The worker running this generation stopped responding (its heartbeat lapsed); submit it again."
)
INTERNAL_MESSAGE = "Generation failed: internal error"


def request_to_json(request: GenerationRequest) -> Json:
    """The request as a SAQ job's kwargs; edit images as base64 (see jobs/edit_json.py)."""
    data = dataclasses.asdict(dataclasses.replace(request, edit=None))
    data["edit"] = edit_to_json(request.edit) if request.edit is not None else None
    return data


def request_from_json(data: Json) -> GenerationRequest:
    fields = {name: value for name, value in data.items() if name not in ("edit", "loras")}
    loras = tuple(LoraWeight(lora["name"], lora["weight"]) for lora in data.get("loras", ()))
    return GenerationRequest(**fields, edit=edit_from_json(data.get("edit")), loras=loras)


def progress_to_json(progress: Progress) -> Json:
    data: Json = {
        "stage": progress.stage.value,
        "step": progress.current_step,
        "total": progress.total_steps,
        "percentage": progress.percentage,
        "image": progress.current_image,
        "images": progress.total_images,
        "eta": progress.eta_ms,
    }
    if progress.preview is not None:
        p = progress.preview
        data["preview"] = [base64.b64encode(p.jpeg).decode(), p.width, p.height, p.step]
    return data


def progress_from_json(data: Json) -> Progress:
    preview = None
    if data.get("preview"):
        jpeg, width, height, step = data["preview"]
        preview = Preview(base64.b64decode(jpeg), width, height, step)
    return Progress(
        stage=Stage(data["stage"]),
        current_step=data["step"],
        total_steps=data["total"],
        percentage=data["percentage"],
        current_image=data["image"],
        total_images=data["images"],
        eta_ms=data.get("eta"),
        preview=preview,
    )


def complete_outcome(result: Result) -> Json:
    """The job function's return value for a finished batch: base64 PNGs, seeds, timings."""
    return {
        "outcome": "complete",
        "images": [
            [base64.b64encode(image.png).decode(), image.seed, image.width, image.height]
            for image in result.images
        ],
        "timeTaken": result.time_taken_ms,
        "timings": dataclasses.asdict(result.timings) if result.timings else None,
    }


def error_outcome(error: JobError) -> Json:
    return {"outcome": "error", "message": error.message, "code": error.code.value}


CANCELLED_OUTCOME: Json = {"outcome": "cancelled"}


def _result(data: Json) -> Result:
    images = tuple(
        GeneratedImage(base64.b64decode(png), seed, width, height)
        for png, seed, width, height in data["images"]
    )
    timings = StageTimings(**data["timings"]) if data.get("timings") else None
    return Result(images, data["timeTaken"], timings=timings)


def _finished(job: SaqJob, *, with_result: bool) -> tuple[JobStatus, dict[str, Any]]:
    """The status and fields of a job SAQ has finished."""
    if job.status is Status.COMPLETE:
        outcome: Json = job.result if isinstance(job.result, dict) else {}
        kind = outcome.get("outcome")
        if kind == "complete":
            return JobStatus.COMPLETE, {"result": _result(outcome)} if with_result else {}
        if kind == "cancelled":
            return JobStatus.CANCELLED, {}
        if kind == "error":
            error = JobError(outcome["message"], ErrorCode(outcome["code"]))
            return JobStatus.ERROR, {"error": error}
    if job.status is Status.ABORTED:
        return JobStatus.ERROR, {"error": JobError(WORKER_LOST_MESSAGE, ErrorCode.WORKER_LOST)}
    return JobStatus.ERROR, {"error": JobError(INTERNAL_MESSAGE, ErrorCode.UNKNOWN_ERROR)}


def to_job(job: SaqJob, cancelled_at: int | None, *, summary: bool = False) -> Job:
    """Our view of a SAQ job record; `cancelled_at` is its cancel mark (ms), if any.

    A `summary` (for a listing) leaves out the progress and the result: status, times and
    version are all a listing shows, and decoding every image of a list is what it avoids.
    """
    meta = job.meta or {}
    version = int(meta.get("v", 0))
    fields: dict[str, Any] = {}
    updated = max(job.queued, job.started, job.touched, job.completed)
    if cancelled_at is not None:
        status = JobStatus.CANCELLED
        updated = max(updated, cancelled_at)
        version += 1
    elif job.status in (Status.NEW, Status.QUEUED):
        status = JobStatus.PENDING
    elif job.status in (Status.ACTIVE, Status.ABORTING):
        status = JobStatus.IN_PROGRESS
        raw = meta.get("progress")
        fields["progress"] = (
            None
            if summary
            else (
                progress_from_json(raw)
                if raw
                else Progress(Stage.LOADING, 0, 0, 0.0, 1, (job.kwargs or {})["request"]["count"])
            )
        )
    else:
        status, fields = _finished(job, with_result=not summary)
        version += 1
    return Job(
        id=job.key,
        request=request_from_json((job.kwargs or {})["request"]),
        status=status,
        created_at=job.queued,
        updated_at=updated,
        started_at=job.started or None,
        version=version,
        **fields,
    )
