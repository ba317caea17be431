"""Overhead: one job through the server against the same pipeline called directly.

Built-in model, 512x512, 20 steps, euler_a, count=1, one seed. Each round runs, one after
the other and never at the same time (the machine has few cores):

  server   POST, then GET every --poll-ms until `complete` (wall time POST -> that poll)
  raw      a plain diffusers StableDiffusionPipeline call in this process + PNG encode
  backend  diffusiond's DiffusersBackend.generate in this process + PNG encode (optional)

Both sides use the same torch thread count. The server's times are measured by polling,
so each "seen at" time is late by up to one poll interval plus one GET's round trip: the
poll interval is a floor on the resolution. The server's own figures (`timeTaken`, and
`updatedAt - createdAt`) are shown beside them.

    python bench/overhead.py --rounds 8 --threads 2
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as `python bench/overhead.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import (
    DEFAULT_HOME,
    Budget,
    ForeignLoad,
    default_threads,
    fmt,
    median,
    print_table,
    start_server,
    stop_on_sigterm,
    wait_until_quiet,
)

TARGET_RATIO = 1.05
TERMINAL = {"complete", "error", "cancelled"}


@dataclass(frozen=True)
class Params:
    prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: str = "euler_a"

    def body(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "cfgScale": self.cfg_scale,
            "seed": self.seed,
            "sampler": self.sampler,
            "count": 1,
        }


@dataclass
class ServerRun:
    """Milliseconds from just before the POST; 'seen' times are the poll that saw it."""

    post_ms: float = float("nan")  # the POST's own round trip
    in_progress_ms: float = float("nan")
    last_step_ms: float = float("nan")  # diffusion at its last step, or decoding, first seen
    decoding_ms: float = float("nan")
    complete_ms: float = float("nan")
    time_taken_ms: float = float("nan")  # the job's result.timeTaken
    span_ms: float = float("nan")  # the job's updatedAt - createdAt
    polls: int = 0
    poll_ms: list[float] = field(default_factory=list)  # each GET's round trip, last excluded
    png: bytes = b""


def _note_progress(run: ServerRun, job: dict[str, Any], seen: float) -> None:
    """Record the first poll that saw each milestone."""
    progress = job.get("progress") or {}
    stage = progress.get("stage")
    at_last_step = stage == "diffusion" and progress.get("currentStep") == progress.get(
        "totalSteps"
    )
    if job["status"] == "in_progress" and math.isnan(run.in_progress_ms):
        run.in_progress_ms = seen
    if (at_last_step or stage == "decoding") and math.isnan(run.last_step_ms):
        run.last_step_ms = seen
    if stage == "decoding" and math.isnan(run.decoding_ms):
        run.decoding_ms = seen


def run_server_job(
    client: httpx.Client, params: Params, poll_s: float, limit_s: float
) -> ServerRun:
    run = ServerRun()
    start = time.perf_counter()

    def since() -> float:
        return (time.perf_counter() - start) * 1000

    response = client.post("/v1/images/generations", json=params.body())
    run.post_ms = since()
    response.raise_for_status()
    job_id = response.json()["id"]
    tick = 1
    while True:
        # Poll on a fixed grid from the POST; a missed tick is skipped, not made up.
        wait = start + tick * poll_s - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        tick = max(tick + 1, int((time.perf_counter() - start) / poll_s) + 1)
        sent = time.perf_counter()
        reply = client.get(f"/v1/images/generations/{job_id}")
        seen = since()
        latency_ms = (time.perf_counter() - sent) * 1000
        run.polls += 1
        reply.raise_for_status()
        job = reply.json()
        _note_progress(run, job, seen)
        status = job["status"]
        if status not in TERMINAL:
            run.poll_ms.append(latency_ms)
        elif status == "complete":
            run.complete_ms = seen
            run.time_taken_ms = float(job["result"]["timeTaken"])
            run.span_ms = float(job["updatedAt"] - job["createdAt"])
            run.png = base64.b64decode(job["result"]["images"][0]["image"])
            return run
        else:
            raise RuntimeError(f"job {job_id} ended {status}: {job.get('error')}")
        if seen > limit_s * 1000:
            client.delete(f"/v1/images/generations/{job_id}")
            raise RuntimeError(f"job {job_id} not complete after {limit_s} s (last: {status})")


def make_raw_call(home: Path, params: Params) -> Callable[[], bytes]:
    """A plain diffusers pipeline on the same model folder, euler_a, PNG-encoded as the server."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from diffusiond.backends.builtin_model import builtin_model_path
    from diffusiond.imaging import encode_png

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(builtin_model_path(home)),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def call() -> bytes:
        image = pipe(
            params.prompt,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg_scale,
            generator=torch.Generator().manual_seed(params.seed),
        ).images[0]
        return encode_png(image)

    return call


def make_backend_call(home: Path, params: Params, threads: int) -> Callable[[], bytes]:
    """diffusiond's own backend in this process: the server's path minus HTTP and threads."""
    from diffusiond.backends.base import ImageSpec
    from diffusiond.backends.diffusers_backend import DiffusersBackend
    from diffusiond.imaging import encode_png

    backend = DiffusersBackend(model_path=None, home=home, device="cpu", torch_threads=threads)
    backend.load()
    spec = ImageSpec(
        prompt=params.prompt,
        negative_prompt="",
        width=params.width,
        height=params.height,
        steps=params.steps,
        cfg_scale=params.cfg_scale,
        seed=params.seed,
        sampler=params.sampler,
    )

    def call() -> bytes:
        image = backend.generate(spec, lambda _stage, _step, _total: None, lambda: False)
        return encode_png(image)

    return call


def timed(call: Callable[[], bytes]) -> tuple[float, bytes]:
    start = time.perf_counter()
    png = call()
    return (time.perf_counter() - start) * 1000, png


def same_pixels(a: bytes, b: bytes) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(a)) as first, Image.open(io.BytesIO(b)) as second:
        return first.size == second.size and first.tobytes() == second.tobytes()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds (default 8)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch threads, server and direct alike (default: the cores we may use)",
    )
    parser.add_argument("--poll-ms", type=float, default=10.0, help="poll interval (10 ms)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="width and height (512)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prompt", default="a cat")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument(
        "--no-backend", action="store_true", help="skip the in-process DiffusersBackend column"
    )
    parser.add_argument("--job-limit-s", type=float, default=120.0, help="give up on a job after")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.1,
        help="redo a round when other processes used more cores than this (0.1)",
    )
    parser.add_argument(
        "--quiet-budget-s",
        type=float,
        default=120.0,
        help="seconds allowed in all for waiting on other load and redoing disturbed work (120)",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or args.poll_ms <= 0:
        parser.error("--rounds and --threads must be >= 1, --warmup >= 0, --poll-ms > 0")
    return args


@dataclass
class Round:
    server: ServerRun
    raw_ms: float
    backend_ms: float
    order: str
    other_load: float


def run_rounds(
    client: httpx.Client,
    server_pid: int,
    params: Params,
    args: argparse.Namespace,
    *,
    raw_call: Callable[[], bytes],
    backend_call: Callable[[], bytes] | None,
) -> tuple[list[Round], list[str]]:
    """Warm-up and measured rounds, strictly one thing at a time, order rotated per round.

    The server is idle once the poll has seen its job complete, so the direct calls never
    overlap a server generation (and the server never runs while a direct call does).
    A round during which other processes used more than --max-other cores is redone, after
    waiting for the machine to be quiet again, while --quiet-budget-s lasts.
    """
    names = ["server", "raw"] + (["backend"] if backend_call is not None else [])
    calls = {"raw": raw_call, "backend": backend_call}
    rounds: list[Round] = []
    checks: list[str] = []
    monitor = ForeignLoad(server_pid)
    index = 0
    while index < args.warmup + args.rounds:
        order = names[index % len(names) :] + names[: index % len(names)]
        monitor.sample()
        srv = ServerRun()
        pngs: dict[str, bytes] = {}
        times: dict[str, float] = {"backend": float("nan")}
        for name in order:
            call = calls.get(name)
            if call is None:
                srv = run_server_job(client, params, args.poll_ms / 1000, args.job_limit_s)
                pngs[name] = srv.png
            else:
                times[name], pngs[name] = timed(call)
        other = monitor.sample()
        if index == 0:
            for name in names[1:]:
                checks.append(f"server image == {name} image: {same_pixels(srv.png, pngs[name])}")
        if index >= args.warmup and other > args.max_other and args.budget.left() > 0:
            print(f"  round {index - args.warmup + 1}: other load {other:.2f} cores: redone")
            wait_until_quiet(args.budget.left())
            continue
        if index >= args.warmup:
            rounds.append(Round(srv, times["raw"], times["backend"], ">".join(order), other))
        index += 1
    return rounds, checks


def print_rounds(rounds: list[Round], with_backend: bool) -> None:
    headers = ["round", "POST", "in_prog", "last_step", "decoding", "complete", "timeTaken"]
    headers += ["upd-cre", "polls", "poll_p50", "poll_max", "raw", "srv/raw"]
    headers += ["backend", "srv/backend"] if with_backend else []
    headers += ["other", "order"]
    rows: list[list[str]] = []
    for index, r in enumerate(rounds):
        srv = r.server
        row = [str(index + 1), fmt(srv.post_ms), fmt(srv.in_progress_ms), fmt(srv.last_step_ms)]
        row += [fmt(srv.decoding_ms), fmt(srv.complete_ms), fmt(srv.time_taken_ms, 0)]
        row += [fmt(srv.span_ms, 0), str(srv.polls), fmt(median(srv.poll_ms))]
        row += [fmt(max(srv.poll_ms, default=math.nan)), fmt(r.raw_ms)]
        row += [fmt(srv.complete_ms / r.raw_ms, 3)]
        if with_backend:
            row += [fmt(r.backend_ms), fmt(srv.complete_ms / r.backend_ms, 3)]
        rows.append([*row, fmt(r.other_load, 2), r.order])

    def med(get: Callable[[Round], float], digits: int = 1) -> str:
        return fmt(median([get(r) for r in rounds]), digits)

    row = ["median", med(lambda r: r.server.post_ms), med(lambda r: r.server.in_progress_ms)]
    row += [med(lambda r: r.server.last_step_ms), med(lambda r: r.server.decoding_ms)]
    row += [med(lambda r: r.server.complete_ms), med(lambda r: r.server.time_taken_ms, 0)]
    row += [med(lambda r: r.server.span_ms, 0), med(lambda r: r.server.polls, 0)]
    all_polls = [ms for r in rounds for ms in r.server.poll_ms]
    row += [fmt(median(all_polls)), fmt(max(all_polls, default=math.nan))]
    row += [med(lambda r: r.raw_ms), med(lambda r: r.server.complete_ms / r.raw_ms, 3)]
    if with_backend:
        row += [med(lambda r: r.backend_ms), med(lambda r: r.server.complete_ms / r.backend_ms, 3)]
    rows.append([*row, fmt(max(r.other_load for r in rounds), 2), "(max; per-round ratios)"])
    print_table(headers, rows)


def main() -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    stop_on_sigterm()
    args = parse_args()
    args.budget = Budget(args.quiet_budget_s)
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # before diffusers: no torchvision notices
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    params = Params(args.prompt, args.size, args.size, args.steps, 7.5, args.seed)
    wall = time.monotonic()
    print(
        f"overhead: {args.size}x{args.size}, {args.steps} steps, euler_a, count=1, seed "
        f"{args.seed}; torch threads {args.threads} (server and direct); poll every "
        f"{args.poll_ms:g} ms; {args.rounds} rounds after {args.warmup} warm-up"
    )
    wait_until_quiet(args.budget.left())
    with start_server(home=args.home, torch_threads=args.threads) as server:
        print(f"server pid {server.pid} at {server.url}, ready in {server.startup_s:.1f} s")
        # Loaded while the server is idle; the server's model folder exists by now.
        raw_call = make_raw_call(args.home, params)
        backend_call = (
            None if args.no_backend else make_backend_call(args.home, params, args.threads)
        )
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            rounds, checks = run_rounds(
                client, server.pid, params, args, raw_call=raw_call, backend_call=backend_call
            )
    print()
    print("times in ms from just before the POST; in_prog/last_step/decoding/complete are the")
    print(f"poll that first saw them (resolution: {args.poll_ms:g} ms poll interval + one GET);")
    print("timeTaken = job's result.timeTaken; upd-cre = job's updatedAt - createdAt;")
    print("poll_p50/max = GET round trips while the job was pending/in_progress;")
    print("raw = diffusers pipeline call + PNG encode; backend = DiffusersBackend.generate + PNG;")
    print("other = CPU load of other processes during the round, in cores (> ~0.1: suspect)")
    print()
    print_rounds(rounds, backend_call is not None)
    print()
    for check in checks:
        print(check)
    srv_med = median([r.server.complete_ms for r in rounds])
    raw_med = median([r.raw_ms for r in rounds])
    ratio = srv_med / raw_med
    taken_ratio = median([r.server.time_taken_ms for r in rounds]) / raw_med
    verdict = "OK" if ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"run took {time.monotonic() - wall:.0f} s")
    print(
        f"SUMMARY overhead: threads={args.threads} server POST->complete median "
        f"{srv_med:.1f} ms vs raw direct {raw_med:.1f} ms: ratio {ratio:.3f} "
        f"(target <= {TARGET_RATIO}, {verdict}); timeTaken/raw {taken_ratio:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
