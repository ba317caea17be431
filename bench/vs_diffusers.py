"""A served diffusiond job against a plain diffusers script on the same folder.

The SD 1.5-shaped model (bench/sd15_model.py), 512x512, bfloat16, cfg 7.5, euler_a, the
same seed both ways. *plain* is what a diffusers user writes (`from_pretrained(folder,
torch_dtype=...)`, the same sampler, `pipe(...)`) in a child process; *served* is a real
`diffusiond serve` (add --compile to pass it on). Both stay loaded and take turns after
one warm-up job each (the warm-up of a compiled server includes its compile). Prints the
step and decode times, plain/served ratios (median and range), achieved TFLOPS and share
of the 1.72 TFLOPS bf16 matmul peak, peak RSS, PSNR between the two images, and SUMMARY.

    python bench/vs_diffusers.py --rounds 3 --steps 3
    python bench/vs_diffusers.py --compile --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/vs_diffusers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._sd15_jobs import (
    DECODE_GFLOP,
    STEP_GFLOP,
    Child,
    JobTimes,
    Served,
    alternate,
    psnr,
    ratio_range,
    tflops,
)
from bench._server import default_threads, stop_on_sigterm
from bench.sd15_model import ensure_sd15_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true", help="serve with --compile")
    args = parser.parse_args()
    stop_on_sigterm()
    folder = ensure_sd15_model().folder
    print(f"SD 1.5-shaped, 512x512, {args.steps} steps, {args.dtype}, {args.threads} threads")
    plain = Child("plain", folder, args.dtype, args.threads)
    try:
        served = Served(folder, args.dtype, args.threads, *(["--compile"] if args.compile else []))
        print(f"server ready in {served.server.startup_s:.0f} s", flush=True)
        try:
            with tempfile.TemporaryDirectory() as scratch:
                sides = {"plain": plain, "served": served}
                first, results = alternate(sides, args.rounds, args.steps, args.seed, Path(scratch))
                image_psnr = psnr(Path(scratch) / "served.png", Path(scratch) / "plain.png")
        finally:
            served.stop()
    finally:
        plain.stop()
    report(first, results, image_psnr)


def report(
    first: dict[str, JobTimes], results: dict[str, list[JobTimes]], image_psnr: float
) -> None:
    plain, served = results["plain"], results["served"]
    for name, runs in results.items():
        step = statistics.median(t.step_s for t in runs)
        decode = statistics.median(t.decode_s for t in runs)
        print(
            f"{name:<7} step {step:.2f} s: {tflops(STEP_GFLOP, step)}; "
            f"decode {decode:.2f} s: {tflops(DECODE_GFLOP, decode)}; "
            f"peak RSS {runs[-1].peak_rss_mb:.0f} MB; first job {first[name].image_s:.0f} s"
        )
    step_ratio = ratio_range([t.step_s for t in plain], [t.step_s for t in served])
    decode_ratio = ratio_range([t.decode_s for t in plain], [t.decode_s for t in served])
    print(f"plain / served: step {step_ratio}, decode {decode_ratio}; PSNR {image_psnr:.1f} dB")
    print(
        f"SUMMARY served vs plain diffusers: step {step_ratio.split()[0]} faster, decode "
        f"{decode_ratio.split()[0]} faster, served peak RSS {served[-1].peak_rss_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
