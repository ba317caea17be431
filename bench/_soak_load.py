"""The soak's load: submitters, pollers and the canceller, each a thread over one `Soak`
(see bench/soak.py)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import httpx

from bench._soak_requests import (
    CANCEL_WINDOW_S,
    DOUBLE_CANCEL,
    JSON_HEADERS,
    PATH,
    TERMINAL,
    Request,
    make_request,
)
from bench._soak_state import Job, Soak

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
