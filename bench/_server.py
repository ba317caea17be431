"""Start and stop a diffusiond server subprocess for the benchmarks, plus small shared helpers.

`start_server` runs `python -m diffusiond serve --port 0` through diffusiond.testing.harness
(the process wrapper the tests use too) and returns once the `diffusiond: ready` line
arrives (the model is loaded). `Server.stop` sends SIGTERM and waits. Everything is bounded
in time: a server that does not come up in time is stopped. Unlike the tests, the benchmarks
pass the caller's IMAGE_* settings on to the server.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from diffusiond.testing import harness
from diffusiond.testing.harness import ServerError, ServerProcess

DEFAULT_HOME = Path("/tmp/bench-home")
ROOT = Path(__file__).resolve().parent.parent

Server = ServerProcess
__all__ = ["Server", "ServerError", "start_server"]


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `with start_server(...)` still stops the server."""

    def handle(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handle)


def default_threads() -> int:
    """What the server defaults to: the cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def start_server(
    *,
    home: Path = DEFAULT_HOME,
    torch_threads: int | None = None,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
    listen_timeout_s: float = 60.0,
    ready_timeout_s: float = 300.0,
) -> Server:
    """Start `diffusiond serve` on a free port and return once its model is loaded."""
    args = ["--home", str(home), "--log-level", log_level]
    if torch_threads is not None:
        args += ["--torch-threads", str(torch_threads)]
    return harness.start_server(
        [*args, *extra_args],
        harness.server_env(inherit_settings=True),
        cwd=ROOT,
        listen_timeout_s=listen_timeout_s,
        ready_timeout_s=ready_timeout_s,
    )


# -- other load on the machine ----------------------------------------------------------


def _machine_busy_ticks() -> int:
    """Busy CPU time of the whole machine, in clock ticks, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return sum(fields) - idle - guest


def _process_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


class ForeignLoad:
    """CPU time that neither this process nor the given ones used, over a stretch of time.

    The benchmarks need the machine to themselves; this tells a round that shared it.
    `sample()` returns the foreign load since the last sample in cores (1.0 = one core busy).
    """

    def __init__(self, *pids: int) -> None:
        self._pids = (os.getpid(), *pids)
        self._tick_s = 1 / os.sysconf("SC_CLK_TCK")
        self._last = self._read()

    def _read(self) -> tuple[float, int, int]:
        own = sum(_process_ticks(pid) for pid in self._pids)
        return time.monotonic(), _machine_busy_ticks(), own

    def sample(self) -> float:
        now = self._read()
        then, self._last = self._last, now
        elapsed = now[0] - then[0]
        if elapsed <= 0:
            return 0.0
        foreign_ticks = (now[1] - then[1]) - (now[2] - then[2])
        return max(0.0, foreign_ticks * self._tick_s / elapsed)


def wait_until_quiet(limit_s: float, threshold: float = 0.1, window_s: float = 1.0) -> float:
    """Wait (at most `limit_s`) for a `window_s` stretch with < `threshold` cores of others'
    load; return the last measured load. Prints what it waits for."""
    if limit_s <= 0:
        return math.nan
    deadline = time.monotonic() + limit_s
    monitor = ForeignLoad()
    announced = False
    while True:
        time.sleep(window_s)
        load = monitor.sample()
        if load < threshold or time.monotonic() >= deadline:
            if load >= threshold:
                print(f"warning: machine still busy ({load:.2f} cores of other load); going on")
            return load
        if not announced:
            print(f"waiting (up to {limit_s:.0f} s) for other load ({load:.2f} cores) to stop...")
            announced = True


class Budget:
    """Wall-clock time allowed, in all, for waiting on other load and redoing disturbed work.

    Once spent, nothing more waits or is redone: the run ends on time and disturbed rounds
    are kept (their `other` column shows it).
    """

    def __init__(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._deadline - time.monotonic())


# -- numbers -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank: an observed value, never interpolated."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain, right-aligned text table."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
