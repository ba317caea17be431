"""Live features: what previews and 50 event streams cost a generation.

1. Previews, in one process on one loaded pipeline (built-in model, 512x512, 20 steps by
   default): the same job with `preview: true` (a preview after every step) and without,
   interleaved; the figure is each job's own `timeTaken`. Target: <= 1.05.
2. Event streams, through a real server: the same job with no event stream open and with
   50 clients following it over SSE (`GET .../events`), interleaved. Every stream must see
   the final event. The client runs at nice 19 (it shares the machine's cores with the
   server). Target: <= 1.05.

    python bench/live.py --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as `python bench/live.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["HF_HUB_OFFLINE"] = "1"

from bench._server import DEFAULT_HOME, default_threads, fmt, median, print_table, start_server
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.engine.engine import Engine
from diffusiond.jobs.models import GenerationRequest
from diffusiond.jobs.registry import GenerationRegistry

TARGET_RATIO = 1.05


def preview_rounds(args: argparse.Namespace) -> None:
    backend = DiffusersBackend(
        model_path=None, home=args.home, device="cpu", torch_threads=args.threads
    )
    registry = GenerationRegistry(ttl_ms=3_600_000)
    engine = Engine(registry, backend, max_concurrent=1)
    engine.start()
    engine.load_model()
    plain = GenerationRequest(
        prompt="a lighthouse", width=args.size, height=args.size, steps=args.steps, seed=7
    )
    previewed = GenerationRequest(**{**plain.__dict__, "preview_every": 1})

    def run(request: GenerationRequest) -> float:
        job = engine.submit(request)
        while not (current := registry.get(job.id)).status.is_terminal():
            time.sleep(0.05)  # a slow in-process poll: the job's own timeTaken is the figure
        assert current.result is not None, current
        return current.result.time_taken_ms

    run(plain)  # warm-up
    times: dict[str, list[float]] = {"no previews": [], "preview every step": []}
    for _ in range(args.rounds):
        times["no previews"].append(run(plain))
        times["preview every step"].append(run(previewed))
    engine.shutdown()
    report(
        f"1. previews, {args.size}x{args.size}, {args.steps} steps, {args.rounds} rounds",
        times,
        "no previews",
        "preview every step",
    )


async def follow(http: httpx.AsyncClient, job_id: str) -> str:
    """Read one job's event stream to its end; the name of the last event."""
    last = ""
    async with http.stream("GET", f"/v1/images/generations/{job_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                last = line.removeprefix("event: ")
    return last


async def stream_round(url: str, body: dict[str, Any], streams: int) -> float:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        created = await http.post("/v1/images/generations", json=body)
        job_id = created.json()["id"]
        if streams:
            finals = await asyncio.gather(*(follow(http, job_id) for _ in range(streams)))
            assert finals == ["complete"] * streams, finals
        while True:
            state = (await http.get(f"/v1/images/generations/{job_id}")).json()
            if state["status"] in {"complete", "error", "cancelled"}:
                break
            await asyncio.sleep(0.5)  # the advised poll interval
        assert state["status"] == "complete", state
        return float(state["result"]["timeTaken"])


def stream_rounds(args: argparse.Namespace) -> None:
    body = {"prompt": "a lighthouse", "width": args.size, "height": args.size}
    body |= {"steps": args.steps, "seed": 7}
    with start_server(home=args.home, torch_threads=args.threads) as server:
        # The streams' client shares the server's 2 cores: at nice 19 its own CPU (parsing
        # 50 streams in Python costs it ~3x what serving them costs the server) comes out of
        # what generation leaves, as it would for a client on another machine.
        os.nice(19)
        asyncio.run(stream_round(server.url, body, 0))  # warm-up
        times: dict[str, list[float]] = {"no streams": [], f"{args.streams} streams": []}
        for _ in range(args.rounds):
            times["no streams"].append(asyncio.run(stream_round(server.url, body, 0)))
            times[f"{args.streams} streams"].append(
                asyncio.run(stream_round(server.url, body, args.streams))
            )
    report(
        f"2. event streams, {args.size}x{args.size}, {args.steps} steps, {args.rounds} rounds "
        f"(every stream saw the final event)",
        times,
        "no streams",
        f"{args.streams} streams",
    )


def report(title: str, times: dict[str, list[float]], base: str, other: str) -> None:
    baseline = median(times[base])
    rows = [
        [
            name,
            fmt(median(values), 0),
            fmt(min(values), 0),
            fmt(max(values), 0),
            f"{median(values) / baseline:.3f}",
        ]
        for name, values in times.items()
    ]
    print(f"\n{title}")
    print_table(["case", "median ms", "min ms", "max ms", "ratio"], rows)
    ratio = median(times[other]) / baseline
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"SUMMARY {other} / {base} = {ratio:.3f} (target <= {TARGET_RATIO}): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--only", choices=["previews", "streams"])
    args = parser.parse_args()
    if args.only in (None, "previews"):
        preview_rounds(args)
    if args.only in (None, "streams"):
        stream_rounds(args)


if __name__ == "__main__":
    main()
