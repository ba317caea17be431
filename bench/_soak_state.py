"""What the soak's threads share: the jobs seen, the counts, the latencies, and the checks
of one answer against its request (see bench/soak.py)."""

from __future__ import annotations

import argparse
import heapq
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench._server import (
    Server,
)
from bench._soak_requests import RECHECK, SHOWN_VIOLATIONS, TERMINAL

# -- shared state ------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    number: int  # which request (#n) created it
    kind: str
    body: dict[str, Any] | None
    accepted_at: float
    status: str = "pending"  # the last status a GET saw
    terminal: str | None = None  # the first terminal status a GET saw
    terminal_at: float = math.inf  # when that answer arrived (monotonic)
    gone_at: float = math.inf  # when the first 404 arrived
    polls: int = 0
    cancels: list[str] = field(default_factory=list)  # DELETE answers: cancelled/409/404


@dataclass
class Latencies:
    active: list[float] = field(default_factory=list)  # GET answered pending/in_progress
    terminal: list[float] = field(default_factory=list)  # GET answered a terminal state
    gone: list[float] = field(default_factory=list)  # GET answered 404
    post: list[float] = field(default_factory=list)  # POST answered 201
    delete: list[float] = field(default_factory=list)


class Soak:
    """Everything the threads share, behind one lock."""

    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.url = server.url
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.samples: list[str] = []
        self.jobs: dict[str, Job] = {}
        self.active: list[Job] = []  # accepted, not yet seen terminal or gone
        self.recent: list[Job] = []  # seen terminal, not yet gone
        self.latency = Latencies()
        self.next_number = 0
        self.phase_end = 0
        self.submit_deadline = math.inf
        self.cancels: list[tuple[float, int, str]] = []  # (due, tie, job id)
        self.cancel_ready = threading.Condition(self.lock)
        self.rss_peak_kb = 0
        self.started = time.monotonic()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(self.args.http_timeout_s))

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def violate(self, kind: str, message: str) -> None:
        with self.lock:
            self._note(kind, message)

    def next_submission(self) -> int | None:
        with self.lock:
            if self.next_number >= self.phase_end or time.monotonic() >= self.submit_deadline:
                return None
            self.next_number += 1
            return self.next_number - 1

    def add_job(self, job: Job, cancel_at: float | None, tie: int) -> None:
        with self.lock:
            self.jobs[job.id] = job
            self.active.append(job)
            if cancel_at is not None:
                heapq.heappush(self.cancels, (cancel_at, tie, job.id))
                self.cancel_ready.notify()

    def schedule_cancel(self, job_id: str, due: float, tie: int) -> None:
        with self.lock:
            heapq.heappush(self.cancels, (due, tie, job_id))
            self.cancel_ready.notify()

    def due_cancel(self) -> str | None:
        """The next cancel that is due, waiting at most 0.1 s for one."""
        with self.cancel_ready:
            now = time.monotonic()
            if not self.cancels or self.cancels[0][0] > now:
                wait = min(0.1, self.cancels[0][0] - now) if self.cancels else 0.1
                self.cancel_ready.wait(wait)
                return None
            return heapq.heappop(self.cancels)[2]

    def pick(self, rng: random.Random) -> Job | None:
        """A terminal job on a RECHECK share of the ticks, else one not yet seen terminal."""
        with self.lock:
            if self.recent and rng.random() < RECHECK:
                return rng.choice(self.recent)
            return rng.choice(self.active) if self.active else None

    def unresolved(self) -> int:
        """Accepted jobs that no GET has seen terminal and that did not answer 404."""
        with self.lock:
            return len(self.active)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- what a GET saw ------------------------------------------------------------------

    def observe(self, job: Job, data: dict[str, Any], sent: float, got: float) -> None:
        status = str(data.get("status"))
        problem = _body_problem(job, data)
        with self.lock:
            job.polls += 1
            if sent > job.gone_at:
                self._note("reappeared", f"{job.id} answered {status} after a 404")
            if job.terminal is None:
                self._first_sight(job, status, got)
            elif status != job.terminal and sent > job.terminal_at:
                self._note("terminal-changed", f"{job.id}: seen {job.terminal}, then {status}")
        if problem is not None:
            self.violate("body", f"{job.id} (request #{job.number}): {problem}")
        self._check_expiry(job, data, status)

    def _first_sight(self, job: Job, status: str, got: float) -> None:
        """Caller holds the lock."""
        if status not in TERMINAL:
            job.status = status
            return
        job.status = job.terminal = status
        job.terminal_at = got
        if job in self.active:
            self.active.remove(job)
        if got < job.gone_at:
            self.recent.append(job)

    def _check_expiry(self, job: Job, data: dict[str, Any], status: str) -> None:
        """A terminal job still there after TTL + two sweep intervals + 2 s."""
        if status not in TERMINAL or not isinstance(data.get("updatedAt"), int):
            return
        overdue_ms = time.time() * 1000 - data["updatedAt"]
        limit_ms = self.args.ttl_ms + 2 * self.args.cleanup_ms + 2000
        if overdue_ms > limit_ms:
            self.violate("not-swept", f"{job.id} {status} still there {overdue_ms:.0f} ms after")

    def observe_gone(self, job: Job, got: float) -> None:
        with self.lock:
            job.polls += 1
            job.gone_at = min(job.gone_at, got)
            for pool in (self.active, self.recent):
                if job in pool:
                    pool.remove(job)

    def _note(self, kind: str, message: str) -> None:
        """`violate` for a caller that holds the lock."""
        self.violations[kind] += 1
        if len(self.samples) < SHOWN_VIOLATIONS:
            self.samples.append(f"[{kind}] {message}")


def _body_problem(job: Job, data: dict[str, Any]) -> str | None:
    """What is wrong with a 200 GET body, given the request that created the job."""
    status = data.get("status")
    if data.get("id") != job.id:
        return f"id {data.get('id')!r}"
    if status not in (*TERMINAL, "pending", "in_progress"):
        return f"unknown status {status!r}"
    progress = data.get("progress")
    if status == "in_progress" and progress and progress.get("percentage", 0) >= 100:
        return f"in_progress at {progress.get('percentage')} %"
    if status == "error" and not isinstance(data.get("error"), dict):
        return "error without an error object"
    if status != "complete":
        return None
    return _result_problem(job, data.get("result"))


def _result_problem(job: Job, result: Any) -> str | None:
    if not isinstance(result, dict) or not isinstance(result.get("images"), list):
        return "complete without result.images"
    body = job.body
    if body is None:
        return None
    count = body.get("count") or 1
    images = result["images"]
    if len(images) != count:
        return f"{len(images)} images for count {count}"
    for i, image in enumerate(images):
        problem = _image_problem(body, i, image)
        if problem is not None:
            return f"image {i + 1}: {problem}"
    return None


def _image_problem(body: dict[str, Any], i: int, image: dict[str, Any]) -> str | None:
    size = (image.get("width"), image.get("height"))
    if size != (body.get("width", 512), body.get("height", 512)):
        return f"{size[0]}x{size[1]}, asked {body.get('width')}x{body.get('height')}"
    seed = body.get("seed")
    if isinstance(seed, int) and seed >= 0 and image.get("seed") != (seed + i) % 2**32:
        return f"seed {image.get('seed')}, asked {seed} (+{i})"
    if not image.get("image"):
        return "no PNG"
    return None
