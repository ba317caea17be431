"""A served job against the same job on the backend called directly, side by side.

The SD 1.5-shaped model (bench/sd15_model.py), 512x512, bfloat16 by default, the same
seed and settings both ways: a real `diffusiond serve` subprocess (the job POSTed, then
polled every 0.5 s) and `DiffusersBackend.generate` on the main thread of another
process. Both stay loaded and take turns (A, B, B, A, ...), after one warm-up job each.
Prints each job, the served/in-process ratios of the step and decode times (median and
range over the rounds), page faults, peak RSS, the PSNR between the two images, and a
SUMMARY line. A served job that is slower than the same work in-process is a regression
in how the server runs the backend (threads, priorities, allocator), not in the model.

    python bench/served_vs_inprocess.py --rounds 3 --steps 3
    python bench/served_vs_inprocess.py --contiguous   # in-process on the pre-channels-last path
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/served_vs_inprocess.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._sd15_jobs import Child, JobTimes, Served, alternate, psnr, ratio_range
from bench._server import default_threads, stop_on_sigterm
from bench.sd15_model import ensure_sd15_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--contiguous", action="store_true", help="in-process without channels-last"
    )
    args = parser.parse_args()
    stop_on_sigterm()
    folder = ensure_sd15_model().folder
    print(f"SD 1.5-shaped, 512x512, {args.steps} steps, {args.dtype}, {args.threads} threads")
    inprocess = Child("backend", folder, args.dtype, args.threads, contiguous=args.contiguous)
    try:
        served = Served(folder, args.dtype, args.threads)
        try:
            with tempfile.TemporaryDirectory() as scratch:
                sides = {"served": served, "in-process": inprocess}
                _first, results = alternate(
                    sides, args.rounds, args.steps, args.seed, Path(scratch)
                )
                image_psnr = psnr(Path(scratch) / "served.png", Path(scratch) / "in-process.png")
        finally:
            served.stop()
    finally:
        inprocess.stop()
    report(results, image_psnr)


def report(results: dict[str, list[JobTimes]], image_psnr: float) -> None:
    served, local = results["served"], results["in-process"]
    step = ratio_range([t.step_s for t in served], [t.step_s for t in local])
    decode = ratio_range([t.decode_s for t in served], [t.decode_s for t in local])
    faults = statistics.median(t.minor_faults for t in served) / statistics.median(
        t.minor_faults for t in local
    )
    print(f"served / in-process: step {step}, decode {decode}, page faults {faults:.2f}x")
    print(
        f"peak RSS MB: served {served[-1].peak_rss_mb:.0f}, "
        f"in-process {local[-1].peak_rss_mb:.0f}; "
        f"PSNR served vs in-process {image_psnr:.1f} dB"
    )
    print(
        f"SUMMARY served/in-process step {step.split()[0]} decode {decode.split()[0]} "
        f"faults {faults:.2f}x psnr {image_psnr:.1f}dB"
    )


if __name__ == "__main__":
    main()
