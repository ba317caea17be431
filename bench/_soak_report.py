"""The soak's report: final states, latencies, counts, the verdict (see bench/soak.py)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from bench._server import (
    fmt,
    percentile,
    print_table,
)
from bench._soak_requests import MAX_RSS_GROWTH_MB, TERMINAL
from bench._soak_state import Latencies, Soak

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
