"""Churn: what a client that posts a big job and deletes it, in a loop, costs the server.

Issue 14, item 3: every cancelled job used to stay for the whole TTL, so 3,000 rounds of
POST (20,000 characters of prompts) + DELETE kept 3,000 jobs and grew RSS by 80-100 MB. This
starts a real server (built-in model, default settings: IMAGE_MAX_JOBS 1000), warms it up,
then runs the rounds and prints the server's RSS and the jobs it keeps. It asserts nothing:
run it on two checkouts to compare, e.g.

    python bench/churn.py --rounds 3000
    PYTHONPATH=/work/main/src python bench/churn.py --rounds 3000   # another checkout

A 503 (the worker still finishing the step of a job just cancelled) is retried after its
Retry-After, and counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as `python bench/churn.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import DEFAULT_HOME, start_server, stop_on_sigterm

# 20,000 characters in all: the API takes at most 10,000 in each of the two prompts.
PROMPT = ("a lighthouse on a cliff at dusk, " * 350)[:10_000]
NEGATIVE = ("fog, blur, low contrast, " * 450)[:10_000]
JOB = {"prompt": PROMPT, "negativePrompt": NEGATIVE, "width": 64, "height": 64, "steps": 2}
GENERATIONS = "/v1/images/generations"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def one_round(http: httpx.Client) -> int:
    """POST then DELETE one job; how many 503s it met on the way."""
    busy = 0
    while True:
        created = http.post(GENERATIONS, json=JOB)
        if created.status_code != 503:
            break
        busy += 1
        time.sleep(min(1.0, float(created.headers.get("retry-after", "1"))) / 20)
    if created.status_code != 201:
        raise RuntimeError(f"POST answered {created.status_code}: {created.text[:200]}")
    deleted = http.delete(f"{GENERATIONS}/{created.json()['id']}")
    if deleted.status_code not in (200, 409):  # 409: it completed first
        raise RuntimeError(f"DELETE answered {deleted.status_code}: {deleted.text[:200]}")
    return busy


def kept_jobs(http: httpx.Client) -> int:
    return len(http.get(GENERATIONS).json()["generations"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args()
    stop_on_sigterm()
    source = os.environ.get("PYTHONPATH") or "this checkout"
    print(
        f"diffusiond from: {source}; {args.rounds} rounds of POST "
        f"({len(PROMPT) + len(NEGATIVE)} chars of prompts) + DELETE"
    )
    with start_server(home=args.home) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(args.warmup):
            one_round(http)
        start_rss, start_jobs = rss_mb(server.pid), kept_jobs(http)
        started = time.monotonic()
        busy = sum(one_round(http) for _ in range(args.rounds))
        elapsed = time.monotonic() - started
        end_rss, end_jobs = rss_mb(server.pid), kept_jobs(http)
    print(f"rounds/s        {args.rounds / elapsed:.0f} ({elapsed:.1f} s, {busy} x 503 retried)")
    print(f"jobs kept       {start_jobs} after warm-up -> {end_jobs} after the rounds")
    print(f"server RSS (MB) {start_rss:.1f} -> {end_rss:.1f}  (growth {end_rss - start_rss:+.1f})")


if __name__ == "__main__":
    main()
