"""The shared queue: its name, the job options, and the keys diffusiond adds to SAQ's."""

from __future__ import annotations

import math
from dataclasses import dataclass

from saq.queue.redis import RedisQueue

QUEUE_NAME = "diffusiond"
JOB_FUNCTION = "generate"
# SAQ's sweep stores this as the error of a job whose worker stopped beating.
SWEPT_MARK = "diffusiond: worker lost (heartbeat lapsed)"
# SAQ keeps no reason for an abort: a user's cancel is recorded under a key of our own.
CANCEL_PREFIX = f"diffusiond:{QUEUE_NAME}:cancel:"
CANCEL_REASON = "cancelled by the user"
ADMISSION_LOCK = f"diffusiond:{QUEUE_NAME}:admission"
# Every job's id, scored by its creation time (ms): a listing reads it newest first, page by
# page, instead of every record SAQ keeps. Records expire on their own; an id whose record
# is gone is dropped when a listing or a submit meets it.
CREATED_INDEX = f"diffusiond:{QUEUE_NAME}:created"
# A cancel mark outlives its job's record, which expires `ttl` after the job ends.
CANCEL_MARK_SLACK_S = 3600


def cancel_key(job_id: str) -> str:
    return CANCEL_PREFIX + job_id


@dataclass(frozen=True)
class JobOptions:
    """The SAQ options every generation is enqueued with, each set on purpose."""

    ttl_s: int  # finished records expire this long after the job ends (IMAGE_RESULT_TTL_MS)
    heartbeat_s: int  # a running job whose worker is silent this long is swept
    # SAQ's own timeout (default 10 s) stays off: IMAGE_GENERATION_TIMEOUT_MS is enforced by
    # the worker at a diffusion step, so a timed-out job ends TIMEOUT_ERROR, not swept.
    timeout_s: int = 0
    # One attempt: a job whose worker died ends WORKER_LOST rather than running twice.
    retries: int = 1

    @classmethod
    def from_settings(cls, result_ttl_ms: int, heartbeat_s: int) -> JobOptions:
        # SAQ reads ttl 0 as "forever" and -1 as "not at all": IMAGE_RESULT_TTL_MS=0 (gone at
        # the next sweep) becomes the shortest expiry Redis offers, one second.
        return cls(ttl_s=max(1, math.ceil(result_ttl_ms / 1000)), heartbeat_s=heartbeat_s)

    @property
    def cancel_mark_ttl_s(self) -> int:
        return self.ttl_s + CANCEL_MARK_SLACK_S


def open_queue(url: str, kind: type[RedisQueue] = RedisQueue) -> RedisQueue:
    """The diffusiond queue at `url` (not yet connected), as a `kind` (a worker's own)."""
    queue = kind.from_url(url, name=QUEUE_NAME, swept_error_message=SWEPT_MARK)
    assert isinstance(queue, kind)
    return queue
