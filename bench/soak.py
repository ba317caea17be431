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

The parts: _soak_requests.py (the requests and their expected answers), _soak_state.py
(what the threads share, the checks of each answer), _soak_load.py (submitters, pollers,
canceller), _soak_rss.py (the memory monitor), _soak_report.py (the report and verdict);
this file runs the phases.

    python bench/soak.py --jobs 300 --seed 1 [--max-concurrent 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as `python bench/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import (
    DEFAULT_HOME,
    start_server,
    stop_on_sigterm,
)
from bench._soak_load import canceller, poller, submitter
from bench._soak_report import Outcome, print_report
from bench._soak_requests import MAX_BODY_BYTES, MAX_PIXELS, PATH
from bench._soak_rss import monitor, read_rss_kb
from bench._soak_state import Soak
from diffusiond.testing.waits import NeverHappened, eventually

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
    """Whether `done()` held within `limit_s` seconds (a bounded wait that does not fail)."""
    try:
        eventually(done, timeout=max(0.0, limit_s), interval=0.25)
    except NeverHappened:
        return False
    return True


def server_empty(client: httpx.Client) -> bool:
    """No generation admitted or running, and no job left in the list (all swept)."""
    try:
        health = client.get("/health").json()
        listed = client.get(PATH).json()
    except (httpx.HTTPError, ValueError):
        return False
    return health.get("busy") is False and listed.get("generations") == []


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
    # The generation POST takes up to 24 MiB by default (images for editing); the soak's
    # oversize requests test the early 413 at the smallest limit the server allows.
    extra += ["--max-body-bytes", str(MAX_BODY_BYTES)]
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
