"""Scaling out: images per second with 1 and 2 workers, and poll latency through an API node.

A private redis-server, one API node, and N `diffusiond worker` processes (built-in model,
one torch thread each, so that two workers fit this machine's two cores). The same batch of
jobs is submitted at once (the API node has room to queue all of them), and timed from the
first POST to the last completion. Meanwhile a client polls a running job back to back
through the API node; the figure is the latency of those GETs (each is a Redis round trip
or two behind the API node).

    python bench/scale_out.py --jobs 8 --size 256 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as `python bench/scale_out.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["HF_HUB_OFFLINE"] = "1"

from bench._server import DEFAULT_HOME
from diffusiond.testing.deployment import deploy


def run(workers: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = deploy(
            Path(args.home),
            Path(tmp),
            workers=workers,
            apis=1,
            api_args=("--max-queue", str(args.jobs)),
        )
        try:
            with cluster.apis[0].client() as client:
                return _measure(client, args)
        finally:
            cluster.stop()


def _measure(client: httpx.Client, args: argparse.Namespace) -> tuple[float, list[float]]:
    body = {"prompt": "scale out", "width": args.size, "height": args.size, "steps": args.steps}
    started = time.monotonic()
    ids = [client.post("/v1/images/generations", json=body).json()["id"] for _ in range(args.jobs)]
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=str(client.base_url)) as poller:
            while not stop.is_set():
                begun = time.perf_counter()
                poller.get(f"/v1/images/generations/{ids[0]}")
                latencies.append((time.perf_counter() - begun) * 1000)
                time.sleep(args.poll_interval)

    thread = threading.Thread(target=poll)
    thread.start()
    for job_id in ids:
        while client.get(f"/v1/images/generations/{job_id}").json()["status"] != "complete":
            time.sleep(0.05)
    elapsed = time.monotonic() - started
    stop.set()
    thread.join()
    return args.jobs / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=0.01)
    parser.add_argument("--home", default=str(DEFAULT_HOME))
    args = parser.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}; one torch thread per worker")
    print("workers  images/s  poll p50 ms  poll p99 ms  polls")
    for workers in (1, 2):
        rate, latencies = run(workers, args)
        cuts = statistics.quantiles(latencies, n=100)
        print(f"{workers:>7}  {rate:8.3f}  {cuts[49]:11.2f}  {cuts[98]:11.2f}  {len(latencies):5}")


if __name__ == "__main__":
    main()
