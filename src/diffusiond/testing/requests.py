"""Request bodies and calls that tests and benchmarks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from diffusiond.testing.waits import eventually

if TYPE_CHECKING:
    import httpx
    import httpx2

    # A client of a served app, or Starlette's TestClient (built on httpx2) of one in-process.
    HttpClient: TypeAlias = httpx.Client | httpx2.Client

GENERATIONS = "/v1/images/generations"
TERMINAL = frozenset({"complete", "error", "cancelled"})

# Seconds on the built-in model: a job that finishes at once, and one that runs for minutes
# (2048x2048 is about a second a step) so that a test can act on it while it runs.
SMALL: dict[str, Any] = {"prompt": "a small job", "width": 64, "height": 64, "steps": 2}
LONG: dict[str, Any] = {
    "prompt": "a very long job",
    "width": 2048,
    "height": 2048,
    "steps": 150,
    "seed": 1,
}
# The IMAGE_MAX_PIXELS a server needs to accept LONG.
LONG_PIXELS = LONG["width"] * LONG["height"]

Body = dict[str, Any]


def submit(http: HttpClient, body: Body, **headers: str) -> str:
    """POST a generation; its id (the POST must be accepted with 201)."""
    response = http.post(GENERATIONS, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def poll_until(
    http: HttpClient,
    job_id: str,
    done: Callable[[Body], bool] = lambda body: body["status"] in TERMINAL,
    timeout_s: float = 120.0,
    interval_s: float = 0.02,
) -> list[Body]:
    """GET the job until `done(body)`; every body seen, in order (the last one satisfies it)."""
    seen: list[Body] = []

    def reached() -> bool:
        response = http.get(f"{GENERATIONS}/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        return done(seen[-1])

    eventually(
        reached,
        timeout=timeout_s,
        interval=interval_s,
        message=lambda: f"job {job_id} never got there: {seen[-1] if seen else None}",
    )
    return seen


def wait_first_step(http: HttpClient, job_id: str) -> None:
    """Poll until the job is diffusing and has finished at least one step."""
    poll_until(
        http,
        job_id,
        lambda body: (
            body["status"] == "in_progress"
            # in_progress may come a moment before its first progress report
            and (body.get("progress") or {}).get("stage") == "diffusion"
            and (body.get("progress") or {}).get("currentStep", 0) >= 1
        ),
    )


def wait_idle(http: HttpClient, timeout_s: float = 60.0) -> None:
    """Wait until /health says no generation runs (a cancelled one has stopped)."""
    eventually(
        lambda: not http.get("/health").json()["busy"],
        timeout=timeout_s,
        message="the server stayed busy",
    )
