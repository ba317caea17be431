"""The server's memory during the soak: VmRSS sampled every 0.5 s (see bench/soak.py)."""

from __future__ import annotations

import time

from bench._soak_state import Soak


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
