"""Soak: many mixed generations, cancels and polls against one server; nothing lost or leaked.

One server (built-in model; IMAGE_MAX_PIXELS 256*256 so jobs stay short; IMAGE_RESULT_TTL_MS
5000 and IMAGE_CLEANUP_INTERVAL_MS 1000 so the TTL sweep deletes jobs all through the run),
driven over 127.0.0.1 only, by threads of this process:

  submitters  --submitters threads POST --jobs requests in all: about 70 % valid (64..256 px in
              multiples of 8, 1..8 steps, count 1..3, random sampler, seed, cfgScale, nulls and
              unknown extra fields), the rest invalid (wrong types, out-of-range values, bad
              JSON, unknown samplers, bodies over 64 KiB, over the pixel budget, no prompt),
              each with the answer it must get (201, 400 or 413). A busy 503 is retried after
              its Retry-After (capped at --max-retry-wait-s), at most --max-retries times, then
              counted as refused. Request #n is drawn from Random("SEED:n"): reproducible.
  canceller   DELETEs about --cancel-fraction of the accepted jobs 0..1 s after their POST
              (skewed early, median ~0.12 s, so that pending and running jobs are hit; a
              fifth of them twice: cancel must be idempotent)
  pollers     --pollers threads GET accepted jobs every --poll-ms (jittered) until a GET sees
              each terminal, then keep re-polling terminal jobs until the TTL sweep deletes them
              (a tenth of the ticks: a terminal job must never change, a deleted one must
              never come back, and the sweep must delete it in time)
  monitor     the server's RSS (VmRSS in /proc/<pid>/status) every 0.5 s; a line every 10 s

The requests run in three phases: the first --warmup, then the rest in two halves (which
tell a plateau from a steady leak). After each phase the run waits (bounded) until a GET has
seen every accepted job terminal, then until the server is idle (`busy` false) and its job
list is empty (all swept), and reads the RSS there. A job that answers 404 before any GET
saw it terminal is LOST.

Pass: every request sent; accepted == seen terminal and nothing lost; no 5xx but 503; no
transport error; every answer the expected one; no contract violation (terminal jobs that
change, results that do not match the request, DELETE answers that disagree with the final
state, ...); the server idle and empty at the end; RSS growth after the warm-up < 50 MB.
Exit status 0 on pass, 1 on fail.

    python bench/soak.py --jobs 300 --seed 1 [--max-concurrent 2]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as `python bench/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import (
    DEFAULT_HOME,
    Server,
    fmt,
    percentile,
    print_table,
    start_server,
    stop_on_sigterm,
)

PATH = "/v1/images/generations"
TERMINAL = ("complete", "error", "cancelled")
SAMPLERS = (
    *("euler_a", "euler", "heun", "dpm2", "dpm++2s_a"),
    *("dpm++2m", "dpm++2mv2", "lcm", "ddim", "unipc"),
)
PROMPTS = ("a lighthouse at dusk", "a cat", "mountains, oil painting", "ünïcödé 🌋 prompt", "x")
MAX_PIXELS = 256 * 256
MAX_BODY_BYTES = 64 * 1024
MAX_RSS_GROWTH_MB = 50.0
CANCEL_WINDOW_S = 1.0
DOUBLE_CANCEL = 0.2
RECHECK = 0.1  # the share of poller ticks spent re-polling terminal jobs
SHOWN_VIOLATIONS = 25
JSON_HEADERS = {"Content-Type": "application/json"}

# -- the requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str  # "valid", or the way it is invalid
    content: bytes
    expect: int  # the answer it must get: 201, 400 or 413
    body: dict[str, Any] | None = None  # the object sent, when it is one
    chunked: bool = False  # sent without Content-Length, in pieces


def _encode(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def valid_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": rng.choice(PROMPTS),
        "width": rng.randrange(64, 257, 8),
        "height": rng.randrange(64, 257, 8),
        "steps": rng.randint(1, 8),
        "count": rng.randint(1, 3),
        "sampler": rng.choice(SAMPLERS),
        "seed": rng.choice((None, -1, rng.randrange(2**32), 2**32 - 1)),
    }
    if rng.random() < 0.3:
        body["cfgScale"] = rng.choice((0, 1, 7.5, 30, round(rng.uniform(0, 30), 3)))
    if rng.random() < 0.2:
        body["negativePrompt"] = rng.choice(("", "blurry, fog"))
    if rng.random() < 0.2:
        body["clientTag"] = {"n": rng.randrange(10**6)}  # unknown extras are ignored
    if rng.random() < 0.1:  # null takes the default (steps: 20, count: 1)
        body[rng.choice(("cfgScale", "negativePrompt", "sampler", "seed", "steps", "count"))] = None
    return body


def _valid(rng: random.Random) -> Request:
    body = valid_body(rng)
    return Request("valid", _encode(body), 201, body)


WRONG_TYPES: dict[str, tuple[object, ...]] = {
    "prompt": (5, True, ["a cat"], {"text": "a cat"}),
    "negativePrompt": (0, False, ["fog"]),
    "width": ("64", 64.0, True, [64]),
    "height": ("128", 128.5, False),
    "steps": ("4", 4.0, True, {"n": 4}),
    "cfgScale": ("7.5", True, [7.5]),
    "seed": ("42", 1.5, True, [1]),
    "sampler": (3, True, ["euler"]),
    "count": (1.5, "2", False, 2.0),
}
OUT_OF_RANGE: dict[str, tuple[object, ...]] = {
    "prompt": ("", "   \n\t", "x" * 10_001),
    "negativePrompt": ("y" * 10_001,),
    "width": (0, 56, 100, 2056, -64, 4096),
    "height": (63, 73, 2056),
    "steps": (0, -1, 151, 10**9),
    "cfgScale": (-0.5, 30.01, 1000),
    "seed": (-2, 2**32, 2**63, 2**64),
    "count": (0, -1, 6, 100),
}
BAD_JSON = (
    b"",
    b"{",
    b"not json",
    b'{"prompt": "a cat",}',
    b"\xff\xfe{}",
    b"[1, 2]",
    b"null",
    b'"a cat"',
    b"42",
    b'{"prompt": "a cat", "cfgScale": NaN}',
    b'{"prompt": "a cat"} trailing',
)
BAD_SAMPLERS = ("euler_b", "EULER_A", "", "dpm++3m", "euler_a ", "k_lms")


def _field_value(kind: str, table: dict[str, tuple[object, ...]], rng: random.Random) -> Request:
    body = valid_body(rng)
    name = rng.choice(sorted(table))
    body[name] = rng.choice(table[name])
    return Request(f"{kind}:{name}", _encode(body), 400, body)


def _wrong_type(rng: random.Random) -> Request:
    return _field_value("type", WRONG_TYPES, rng)


def _out_of_range(rng: random.Random) -> Request:
    return _field_value("range", OUT_OF_RANGE, rng)


def _bad_json(rng: random.Random) -> Request:
    return Request("json", rng.choice(BAD_JSON), 400)


def _bad_sampler(rng: random.Random) -> Request:
    body = {**valid_body(rng), "sampler": rng.choice(BAD_SAMPLERS)}
    return Request("sampler", _encode(body), 400, body)


def _no_prompt(rng: random.Random) -> Request:
    body = valid_body(rng)
    if rng.random() < 0.5:
        del body["prompt"]
    else:
        body["prompt"] = None
    return Request("no-prompt", _encode(body), 400, body)


def _over_pixels(rng: random.Random) -> Request:
    """In the API's range, over this server's IMAGE_MAX_PIXELS (width/height left out: 512)."""
    body = valid_body(rng)
    choice = rng.randrange(3)
    if choice == 0:
        body.update(width=512, height=512)
    elif choice == 1:
        body.update(width=2048, height=64)
    else:  # the default 512 times at least 136 is over 256*256
        left_out, kept = rng.choice((("width", "height"), ("height", "width")))
        del body[left_out]
        body[kept] = rng.randrange(136, 257, 8)
    return Request("pixels", _encode(body), 400, body)


def _padded(rng: random.Random, size: int) -> tuple[dict[str, Any], bytes]:
    """A valid body padded by an unknown field to exactly `size` bytes."""
    body = valid_body(rng)
    body["padding"] = ""
    missing = size - len(_encode(body))
    body["padding"] = "p" * missing
    content = _encode(body)
    assert len(content) == size, (len(content), size)
    return body, content


def _oversized(rng: random.Random) -> Request:
    choice = rng.randrange(4)
    if choice == 0:  # the boundary: exactly 64 KiB is allowed
        body, content = _padded(rng, MAX_BODY_BYTES)
        return Request("padded-64KiB", content, 201, body)
    if choice == 1:
        body, content = _padded(rng, MAX_BODY_BYTES + 1)
        return Request("oversize:64KiB+1", content, 413)
    body = {**valid_body(rng), "prompt": "x" * rng.randint(70_000, 300_000)}
    if choice == 2:
        return Request("oversize:prompt", _encode(body), 413)
    return Request("oversize:chunked", _encode(body), 413, chunked=True)


INVALID_MAKERS: tuple[Callable[[random.Random], Request], ...] = (
    _wrong_type,
    _out_of_range,
    _bad_json,
    _bad_sampler,
    _oversized,
    _over_pixels,
    _no_prompt,
)


def make_request(rng: random.Random, invalid_fraction: float) -> Request:
    if rng.random() >= invalid_fraction:
        return _valid(rng)
    return rng.choice(INVALID_MAKERS)(rng)


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


# -- the threads -------------------------------------------------------------------------


def submitter(soak: Soak) -> None:
    with soak.client() as client:
        while not soak.stop.is_set() and (number := soak.next_submission()) is not None:
            rng = random.Random(f"{soak.args.seed}:{number}")
            request = make_request(rng, soak.args.invalid_fraction)
            soak.count(f"sent {'valid' if request.expect == 201 else 'invalid'}")
            submit(soak, client, request, rng, number)


def _post(client: httpx.Client, request: Request) -> httpx.Response:
    if not request.chunked:
        return client.post(PATH, content=request.content, headers=JSON_HEADERS)
    data = request.content

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(data), 16 * 1024):
            yield data[start : start + 16 * 1024]

    return client.post(PATH, content=pieces(), headers=JSON_HEADERS)


def submit(
    soak: Soak, client: httpx.Client, request: Request, rng: random.Random, number: int
) -> None:
    """POST one request; retry a busy 503 after its Retry-After (capped), a bounded number of
    times, then count it refused."""
    for attempt in range(soak.args.max_retries + 1):
        sent = time.monotonic()
        try:
            response = _post(client, request)
        except httpx.HTTPError as exc:
            soak.count("transport errors")
            soak.violate("transport", f"POST #{number} ({request.kind}): {exc!r}")
            return
        latency_ms = (time.monotonic() - sent) * 1000
        soak.count(f"POST {response.status_code}")
        if response.status_code != 503 or request.expect != 201:
            classify(soak, request, response, latency_ms, (number, rng))
            return
        wait = busy_wait(soak, response)
        if attempt == soak.args.max_retries or time.monotonic() + wait > soak.submit_deadline:
            break
        soak.count("busy retries")
        time.sleep(wait + rng.uniform(0, 0.05))
    soak.count("refused (busy after retries)")


def busy_wait(soak: Soak, response: httpx.Response) -> float:
    """The Retry-After of a 503, capped; a 503 without a good one is a violation."""
    cap = float(soak.args.max_retry_wait_s)
    code = _error_code(response)
    header = response.headers.get("retry-after", "")
    if code != "SERVER_BUSY" or not header.isdigit() or not 1 <= int(header) <= 60:
        soak.violate("busy-answer", f"503 code {code!r}, Retry-After {header!r}")
        return cap
    soak.count(f"Retry-After {header} s")
    return min(float(header), cap)


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


EXPECTED_CODES = {400: "INVALID_REQUEST", 413: "PAYLOAD_TOO_LARGE"}


def classify(
    soak: Soak,
    request: Request,
    response: httpx.Response,
    latency_ms: float,
    origin: tuple[int, random.Random],
) -> None:
    number = origin[0]
    status = response.status_code
    where = f"request #{number} ({request.kind})"
    if status >= 500:
        soak.count("server errors (5xx)")
        soak.violate("5xx", f"{where}: {status} {response.text[:300]}")
    if status != request.expect:
        soak.violate(
            "unexpected", f"{where}: {status}, expected {request.expect}: {response.text[:200]}"
        )
    if status == 201:
        accept(soak, request, response, latency_ms, origin)
    elif status in EXPECTED_CODES and _error_code(response) != EXPECTED_CODES[status]:
        soak.violate("error-body", f"{where}: {status} with body {response.text[:200]}")


def accept(
    soak: Soak,
    request: Request,
    response: httpx.Response,
    latency_ms: float,
    origin: tuple[int, random.Random],
) -> None:
    number, rng = origin
    data = response.json()
    job_id = str(data.get("id"))
    if response.headers.get("location") != f"{PATH}/{job_id}" or data.get("status") != "pending":
        soak.violate("201-body", f"request #{number}: {response.headers} {data}")
    if job_id in soak.jobs:
        soak.violate("duplicate-id", f"request #{number} got {job_id} again")
    with soak.lock:
        soak.latency.post.append(latency_ms)
    cancel_at = None
    if rng.random() < soak.args.cancel_fraction:
        # Skewed early (median ~0.12 s), so that pending and running jobs get cancelled too.
        cancel_at = time.monotonic() + CANCEL_WINDOW_S * rng.random() ** 3
    job = Job(job_id, number, request.kind, request.body, time.monotonic())
    soak.add_job(job, cancel_at, number)


def poller(soak: Soak, index: int) -> None:
    rng = random.Random(f"{soak.args.seed}:poller:{index}")
    interval = soak.args.poll_ms / 1000
    with soak.client() as client:
        while not soak.stop.is_set():
            job = soak.pick(rng)
            if job is not None:
                poll(soak, client, job)
            soak.stop.wait(interval * rng.uniform(0.5, 1.5))


def poll(soak: Soak, client: httpx.Client, job: Job) -> None:
    sent = time.monotonic()
    try:
        response = client.get(f"{PATH}/{job.id}")
    except httpx.HTTPError as exc:
        soak.count("transport errors")
        soak.violate("transport", f"GET {job.id}: {exc!r}")
        return
    got = time.monotonic()
    latency_ms = (got - sent) * 1000
    soak.count(f"GET {response.status_code}")
    if response.status_code == 200:
        data = response.json()
        soak.observe(job, data, sent, got)
        terminal = data.get("status") in TERMINAL
        with soak.lock:
            (soak.latency.terminal if terminal else soak.latency.active).append(latency_ms)
    elif response.status_code == 404:
        soak.observe_gone(job, got)
        with soak.lock:
            soak.latency.gone.append(latency_ms)
    else:
        if response.status_code >= 500:
            soak.count("server errors (5xx)")
        soak.violate("unexpected", f"GET {job.id}: {response.status_code} {response.text[:200]}")


def canceller(soak: Soak) -> None:
    rng = random.Random(f"{soak.args.seed}:canceller")
    with soak.client() as client:
        while not soak.stop.is_set():
            job_id = soak.due_cancel()
            if job_id is not None:
                cancel(soak, client, soak.jobs[job_id], rng)


def cancel(soak: Soak, client: httpx.Client, job: Job, rng: random.Random) -> None:
    sent = time.monotonic()
    try:
        response = client.delete(f"{PATH}/{job.id}")
    except httpx.HTTPError as exc:
        soak.count("transport errors")
        soak.violate("transport", f"DELETE {job.id}: {exc!r}")
        return
    latency_ms = (time.monotonic() - sent) * 1000
    status = response.status_code
    soak.count(f"DELETE {status}")
    answer = {200: "cancelled", 409: "409", 404: "404"}.get(status)
    if answer is None:
        if status >= 500:
            soak.count("server errors (5xx)")
        soak.violate("unexpected", f"DELETE {job.id}: {status} {response.text[:200]}")
        return
    if status == 200 and response.json().get("status") != "cancelled":
        soak.violate("delete-body", f"DELETE {job.id}: {response.text[:200]}")
    with soak.lock:
        job.cancels.append(answer)
        soak.latency.delete.append(latency_ms)
        first = len(job.cancels) == 1
    if first and rng.random() < DOUBLE_CANCEL:
        soak.schedule_cancel(job.id, time.monotonic() + rng.uniform(0, 0.3), -job.number)


def read_rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def monitor(soak: Soak) -> None:
    last_line = time.monotonic()
    while not soak.stop.wait(0.5):
        rss = read_rss_kb(soak.server.pid)
        with soak.lock:
            soak.rss_peak_kb = max(soak.rss_peak_kb, rss)
            accepted, active = len(soak.jobs), len(soak.active)
            sent, gets = soak.next_number, soak.counts["GET 200"] + soak.counts["GET 404"]
        if time.monotonic() - last_line >= 10:
            last_line = time.monotonic()
            print(
                f"  t={soak.elapsed():5.0f} s  sent {sent}/{soak.args.jobs}  accepted {accepted}"
                f"  unresolved {active}  GETs {gets}  rss {rss / 1024:.0f} MB",
                flush=True,
            )


# -- phases ------------------------------------------------------------------------------


def run_phase(soak: Soak, name: str, end: int) -> tuple[bool, bool, int]:
    """Submit requests up to #`end`, wait for every job to be seen terminal, then for the
    server to be idle and empty. Returns (drained, settled, rss_kb)."""
    with soak.lock:
        soak.phase_end = end
    threads = [
        threading.Thread(target=submitter, args=(soak,), name=f"submitter-{n}", daemon=True)
        for n in range(soak.args.submitters)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, soak.submit_deadline - time.monotonic() + 120))
    limit = soak.started + soak.args.time_limit_s
    settle_s = soak.args.ttl_ms / 1000 + 2 * soak.args.cleanup_ms / 1000 + 5
    drained = wait_for(
        lambda: soak.unresolved() == 0, min(30.0, limit - settle_s - time.monotonic())
    )
    with soak.client() as client:
        settled = wait_for(lambda: server_empty(client), min(settle_s, limit - time.monotonic()))
    rss = read_rss_kb(soak.server.pid)
    print(
        f"{name}: sent {soak.next_number}, accepted {len(soak.jobs)}, "
        f"unresolved {soak.unresolved()}, server idle and empty: {settled}, "
        f"rss {rss / 1024:.1f} MB, t={soak.elapsed():.0f} s",
        flush=True,
    )
    return drained, settled, rss


def wait_for(done: Callable[[], bool], limit_s: float) -> bool:
    deadline = time.monotonic() + max(0.0, limit_s)
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
    return True


def server_empty(client: httpx.Client) -> bool:
    """No generation admitted or running, and no job left in the list (all swept)."""
    try:
        health = client.get("/health").json()
        listed = client.get(PATH).json()
    except (httpx.HTTPError, ValueError):
        return False
    return health.get("busy") is False and listed.get("generations") == []


# -- the report --------------------------------------------------------------------------


@dataclass
class Outcome:
    rss_before_kb: int
    rss_kb: list[int]  # after the warm-up, the first half and the second half
    drained: bool
    settled: bool
    wall_s: float
    exit_code: int = 0


def final_states(soak: Soak) -> Counter[str]:
    states: Counter[str] = Counter()
    for job in soak.jobs.values():
        if job.terminal is not None:
            states[job.terminal] += 1
        elif job.gone_at < math.inf:
            states["LOST"] += 1
        else:
            states[f"unresolved ({job.status})"] += 1
    return states


def check_cancels(soak: Soak) -> None:
    """A DELETE's answer must agree with the state the job ended in."""
    for job in soak.jobs.values():
        if "cancelled" in job.cancels and job.terminal not in (None, "cancelled"):
            soak.violate("cancel", f"{job.id}: DELETE said cancelled, GET saw {job.terminal}")
        if "409" in job.cancels and job.terminal == "cancelled":
            soak.violate("cancel", f"{job.id}: DELETE answers {job.cancels}, ended cancelled")
        if "404" in job.cancels and job.terminal is None:
            soak.violate("cancel", f"{job.id}: DELETE 404 before any GET saw it terminal")


def latency_rows(latency: Latencies) -> list[list[str]]:
    rows = []
    polls = latency.active + latency.terminal + latency.gone
    named = [
        ("GET pending/in_progress", latency.active),
        ("GET terminal (with PNGs)", latency.terminal),
        ("GET 404 (swept)", latency.gone),
        ("GET all polls", polls),
        ("POST 201", latency.post),
        ("DELETE 200/409/404", latency.delete),
    ]
    for label, values in named:
        rows.append(
            [
                label,
                str(len(values)),
                fmt(percentile(values, 50), 2),
                fmt(percentile(values, 99), 2),
                fmt(max(values, default=math.nan), 2),
            ]
        )
    return rows


def print_counts(soak: Soak) -> None:
    print()
    print("answers and events:")
    for key, value in sorted(soak.counts.items()):
        print(f"  {key:<32} {value}")


def print_report(soak: Soak, outcome: Outcome) -> bool:
    check_cancels(soak)
    print_counts(soak)
    states = final_states(soak)
    accepted = len(soak.jobs)
    terminal = sum(states[s] for s in TERMINAL)
    print()
    print(f"jobs: accepted {accepted}, seen terminal {terminal}  ({dict(states)})")
    spans = [j.terminal_at - j.accepted_at for j in soak.jobs.values() if j.terminal_at < math.inf]
    polls = [j.polls for j in soak.jobs.values()]
    print(
        f"  POST answered -> a GET saw it terminal: p50 {percentile(spans, 50):.2f} s, "
        f"p99 {percentile(spans, 99):.2f} s, max {max(spans, default=math.nan):.2f} s; "
        f"GETs per job min {min(polls, default=0)}, median {percentile(polls, 50):.0f}"
    )
    cancelled_by_delete = sum("cancelled" in job.cancels for job in soak.jobs.values())
    print(
        f"  DELETE sent to {sum(bool(j.cancels) for j in soak.jobs.values())} jobs, "
        f"{cancelled_by_delete} answered cancelled"
    )
    print()
    print("latency (ms, one request's round trip on a kept-alive connection):")
    print_table(["request", "count", "p50", "p99", "max"], latency_rows(soak.latency))
    print()
    warm, mid, end = (kb / 1024 for kb in outcome.rss_kb)
    growth_mb = end - warm
    print(
        f"server RSS (idle, job list empty): before {outcome.rss_before_kb / 1024:.1f} MB, "
        f"after warm-up {warm:.1f} MB, after the first half {mid:.1f} MB, end {end:.1f} MB; "
        f"peak {soak.rss_peak_kb / 1024:.1f} MB"
    )
    print(
        f"growth after warm-up {growth_mb:+.1f} MB (first half {mid - warm:+.1f} MB, "
        f"second half {end - mid:+.1f} MB)"
    )
    print(f"run took {outcome.wall_s:.0f} s (limit {soak.args.time_limit_s:.0f} s)")
    if soak.samples:
        print()
        print(f"violations ({sum(soak.violations.values())}; the first {len(soak.samples)}):")
        for line in soak.samples:
            print(f"  {line}")
    return print_summary(soak, outcome, states, growth_mb)


def print_summary(soak: Soak, outcome: Outcome, states: Counter[str], growth_mb: float) -> bool:
    accepted = len(soak.jobs)
    terminal = sum(states[s] for s in TERMINAL)
    other = sum(n for kind, n in soak.violations.items() if kind not in ("5xx", "transport"))
    criteria = [
        (f"sent={soak.next_number}/{soak.args.jobs}", soak.next_number == soak.args.jobs),
        (f"accepted={accepted} terminal={terminal}", accepted == terminal and outcome.drained),
        (f"lost={states['LOST']}", states["LOST"] == 0),
        (
            f"5xx(not 503)={soak.counts['server errors (5xx)']}",
            soak.counts["server errors (5xx)"] == 0,
        ),
        (
            f"transport_errors={soak.counts['transport errors']}",
            soak.counts["transport errors"] == 0,
        ),
        (f"violations={other}", other == 0),
        (f"idle_and_empty_at_end={outcome.settled}", outcome.settled),
        (f"rss_growth={growth_mb:+.1f}MB<{MAX_RSS_GROWTH_MB:g}", growth_mb < MAX_RSS_GROWTH_MB),
        (f"server_exit={outcome.exit_code}", outcome.exit_code == 0),
    ]
    ok = all(passed for _, passed in criteria)
    parts = [f"{label} {'PASS' if passed else 'FAIL'}" for label, passed in criteria]
    print()
    print(f"SUMMARY soak: {' | '.join(parts)} => {'PASS' if ok else 'FAIL'}")
    return ok


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=300, help="requests to send (300)")
    parser.add_argument("--warmup", type=int, default=30, help="requests in the warm-up (30)")
    parser.add_argument("--pollers", type=int, default=16, help="polling threads (16)")
    parser.add_argument("--submitters", type=int, default=8, help="submitting threads (8)")
    parser.add_argument("--seed", type=int, default=1, help="for every random choice (1)")
    parser.add_argument("--time-limit-s", type=float, default=300.0, help="whole run (300)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="server's (default 1)")
    parser.add_argument("--poll-ms", type=float, default=100.0, help="per poller, jittered")
    parser.add_argument("--invalid-fraction", type=float, default=0.3)
    parser.add_argument("--cancel-fraction", type=float, default=0.25)
    parser.add_argument("--max-retries", type=int, default=30, help="busy retries per request")
    parser.add_argument("--max-retry-wait-s", type=float, default=2.0, help="Retry-After cap")
    parser.add_argument("--ttl-ms", type=int, default=5000, help="IMAGE_RESULT_TTL_MS")
    parser.add_argument("--cleanup-ms", type=int, default=1000, help="IMAGE_CLEANUP_INTERVAL_MS")
    parser.add_argument("--http-timeout-s", type=float, default=15.0)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args(argv)
    if min(args.jobs, args.pollers, args.submitters) < 1 or not 0 <= args.warmup < args.jobs:
        parser.error("--jobs, --pollers, --submitters must be >= 1, 0 <= --warmup < --jobs")
    if args.time_limit_s < 60 or args.poll_ms <= 0:
        parser.error("--time-limit-s must be >= 60 and --poll-ms > 0")
    return args


def server_args(args: argparse.Namespace) -> list[str]:
    extra = ["--max-pixels", str(MAX_PIXELS), "--result-ttl-ms", str(args.ttl_ms)]
    extra += ["--cleanup-interval-ms", str(args.cleanup_ms)]
    if args.max_concurrent is not None:
        extra += ["--max-concurrent", str(args.max_concurrent)]
    return extra


def start_threads(soak: Soak) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=poller, args=(soak, n), daemon=True)
        for n in range(soak.args.pollers)
    ]
    threads.append(threading.Thread(target=canceller, args=(soak,), daemon=True))
    threads.append(threading.Thread(target=monitor, args=(soak,), daemon=True))
    for thread in threads:
        thread.start()
    return threads


def soak_run(soak: Soak, wall: float) -> Outcome:
    args = soak.args
    soak.submit_deadline = soak.started + args.time_limit_s - 45
    rss_before = read_rss_kb(soak.server.pid)
    print(
        f"server pid {soak.server.pid} at {soak.url}, ready in {soak.server.startup_s:.1f} s;"
        f" rss {rss_before / 1024:.1f} MB",
        flush=True,
    )
    mid = (args.warmup + args.jobs + 1) // 2
    phases = [
        (f"warm-up (requests 0..{args.warmup - 1})", args.warmup),
        (f"first half (requests {args.warmup}..{mid - 1})", mid),
        (f"second half (requests {mid}..{args.jobs - 1})", args.jobs),
    ]
    threads = start_threads(soak)
    try:
        results = [run_phase(soak, name, end) for name, end in phases]
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join(args.http_timeout_s + 5)
    return Outcome(
        rss_before_kb=rss_before,
        rss_kb=[rss for _, _, rss in results],
        drained=all(drained for drained, _, _ in results),
        settled=results[-1][1],
        wall_s=time.monotonic() - wall,
    )


def main() -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    stop_on_sigterm()
    args = parse_args()
    wall = time.monotonic()
    concurrency = args.max_concurrent or 1
    print(
        f"soak: {args.jobs} requests (~{1 - args.invalid_fraction:.0%} valid) from "
        f"{args.submitters} submitters, {args.pollers} pollers every ~{args.poll_ms:g} ms, "
        f"~{args.cancel_fraction:.0%} of accepted jobs cancelled; server: max-concurrent "
        f"{concurrency}, max-pixels {MAX_PIXELS}, ttl {args.ttl_ms} ms, sweep every "
        f"{args.cleanup_ms} ms; seed {args.seed}; time limit {args.time_limit_s:.0f} s",
        flush=True,
    )
    with start_server(home=args.home, extra_args=server_args(args)) as server:
        if not server.url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"refusing to soak a server that is not on loopback: {server.url}")
        soak = Soak(args, server)
        soak.started = wall
        outcome = soak_run(soak, wall)
        outcome.exit_code = server.stop()
    print(f"server exit code {outcome.exit_code} (SIGTERM)")
    return 0 if print_report(soak, outcome) else 1


if __name__ == "__main__":
    sys.exit(main())
