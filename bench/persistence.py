"""Persistence: what the sqlite store costs a generation, and each store's throughput.

2. Generation time, side by side in one process on one loaded pipeline (built-in model,
   512x512, 20 steps by default): the same jobs through an engine over the memory store,
   the sqlite store (progress coalesced: one write a second at most), and, to show what the
   coalescing buys, sqlite writing every progress update synchronously. Rounds are
   interleaved (memory, sqlite, sqlite-sync, memory, ...); the figure is each job's own
   `timeTaken`. Target: sqlite / memory <= 1.02.
1. Registry throughput for each store, no model: create, progress update, get, complete
   (one 16 KiB PNG per job), in operations per second.

    python bench/persistence.py --rounds 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/persistence.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["HF_HUB_OFFLINE"] = "1"

from bench._server import DEFAULT_HOME, default_threads, fmt, median, print_table
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.engine.engine import Engine
from diffusiond.jobs.models import (
    GeneratedImage,
    GenerationRequest,
    Job,
    Progress,
    Result,
    Stage,
)
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.jobs.store import JobStore, MemoryStore, SqliteStore

TARGET_RATIO = 1.02


class SyncSqliteStore(SqliteStore):
    """The naive alternative: every progress update is a committed write."""

    def put_progress(self, job: Job) -> None:
        self.put(job)


StoreFactory = Callable[[Path], JobStore]
STORES: dict[str, StoreFactory] = {
    "memory": lambda _folder: MemoryStore(),
    "sqlite": lambda folder: SqliteStore(folder / "jobs.db"),
    "sqlite-sync": lambda folder: SyncSqliteStore(folder / "jobs-sync.db"),
}


def run_job(engine: Engine, registry: GenerationRegistry, request: GenerationRequest) -> Job:
    job = engine.submit(request)
    while not (current := registry.get(job.id)).status.is_terminal():
        time.sleep(0.05)  # a slow in-process poll: the job's own timeTaken is the figure
    return current


def generation_rounds(args: argparse.Namespace, folder: Path) -> None:
    backend = DiffusersBackend(
        model_path=None, home=args.home, device="cpu", torch_threads=args.threads
    )
    backend.load()
    request = GenerationRequest(
        prompt="a lighthouse at dusk", width=args.size, height=args.size, steps=args.steps, seed=7
    )
    engines: dict[str, tuple[Engine, GenerationRegistry, JobStore]] = {}
    for name, factory in STORES.items():
        store = factory(folder)
        registry = GenerationRegistry(ttl_ms=3_600_000, store=store)
        engine = Engine(registry, backend, max_concurrent=1)
        engine.start()
        engine.load_model()
        engines[name] = (engine, registry, store)
    run_job(*engines["memory"][:2], request)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in STORES}
    for _ in range(args.rounds):
        for name, (engine, registry, _store) in engines.items():
            job = run_job(engine, registry, request)
            assert job.result is not None, job
            times[name].append(job.result.time_taken_ms)
    for engine, registry, _store in engines.values():
        engine.shutdown()
        registry.close()

    base = median(times["memory"])
    rows = [
        [
            name,
            fmt(median(values), 0),
            fmt(min(values), 0),
            fmt(max(values), 0),
            f"{median(values) / base:.3f}",
        ]
        for name, values in times.items()
    ]
    print(
        f"\n2. generation time, {args.size}x{args.size}, {args.steps} steps, "
        f"{args.rounds} interleaved rounds, {args.threads} torch threads"
    )
    print_table(["store", "median ms", "min ms", "max ms", "ratio"], rows)
    ratio = median(times["sqlite"]) / base
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"sqlite / memory = {ratio:.3f} (target <= {TARGET_RATIO}): {verdict}")


def throughput(folder: Path, jobs: int) -> None:
    request = GenerationRequest(prompt="x")
    png = os.urandom(16 * 1024)
    rows = []
    for name, factory in STORES.items():
        registry = GenerationRegistry(ttl_ms=3_600_000, store=factory(folder / name))
        started = time.perf_counter()
        ids = [registry.create(request).id for _ in range(jobs)]
        created = time.perf_counter()
        for job_id in ids:
            registry.start(job_id)
        updates = 10
        began = time.perf_counter()
        for step in range(updates):
            for job_id in ids:
                progress = Progress(Stage.DIFFUSION, step, updates, step * 9.0, 1, 1)
                registry.report_progress(job_id, progress)
        updated = time.perf_counter()
        for _ in range(updates):
            for job_id in ids:
                registry.get(job_id)
        got = time.perf_counter()
        for job_id in ids:
            registry.complete(job_id, Result((GeneratedImage(png, 1, 512, 512),), 1))
        completed = time.perf_counter()
        registry.close()
        rows.append(
            [
                name,
                fmt(jobs / (created - started), 0),
                fmt(jobs * updates / (updated - began), 0),
                fmt(jobs * updates / (got - updated), 0),
                fmt(jobs / (completed - got), 0),
            ]
        )
    print(f"\n1. registry throughput, {jobs} jobs (operations per second)")
    print_table(["store", "create", "progress", "get", "complete+png"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--jobs", type=int, default=2000, help="jobs for the throughput part")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffusiond-bench-") as tmp:
        folder = Path(tmp)
        for name in STORES:
            (folder / name).mkdir()
        throughput(folder, args.jobs)
        generation_rounds(args, folder)


if __name__ == "__main__":
    main()
