"""Speed and memory on the SD 1.5-shaped benchmark model (bench/sd15_model.py), 512x512, CPU.

Each configuration runs in a fresh subprocess, so that its peak RSS (VmHWM) is its own:

- naive:  `StableDiffusionPipeline.from_pretrained(folder, torch_dtype=...)`, then
          `pipe(prompt, ...)`: what a diffusers user writes;
- ours:   diffusiond's backend, from the diffusers folder and from the single file.

Each prints the load time, per-step time (the mean of the steps after the first), the
time of the whole image, the VAE decode time and the peak RSS; PSNR of bfloat16 against
float32 on the same seed closes the table, for this model and the built-in one.

    python -m bench.real_model                     # all configurations, 3 steps
    python -m bench.real_model --steps 2 --only ours-folder-bfloat16
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 42
SIZE = 512


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_naive(folder: Path, dtype_name: str, steps: int, out: Path) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - started
    load_peak = peak_rss_mb()
    step_times: list[float] = []
    last = [0.0]

    def on_step(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return tensors

    vae_decode = pipe.vae.decode
    decode_time = [0.0]

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        begun = time.perf_counter()
        result = vae_decode(*args, **kwargs)
        decode_time[0] = time.perf_counter() - begun
        return result

    pipe.vae.decode = timed_decode
    begun = time.perf_counter()
    last[0] = begun
    image = pipe(
        PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
        callback_on_step_end=on_step,
    ).images[0]
    total = time.perf_counter() - begun
    image.save(out)
    return {
        "load_s": loaded,
        "load_peak_rss_mb": load_peak,
        "steps": step_times,
        "decode_s": decode_time[0],
        "image_s": total,
    }


def _run_ours(model: Path, dtype_name: str, steps: int, out: Path) -> dict[str, Any]:
    from diffusiond.backends.base import ImageSpec
    from diffusiond.backends.diffusers_backend import DiffusersBackend
    from diffusiond.jobs.models import Stage
    from diffusiond.settings import default_threads

    started = time.perf_counter()
    backend = DiffusersBackend(
        model_path=model,
        home=model.parent,
        device="cpu",
        torch_threads=default_threads(),
        dtype=dtype_name,
    )
    backend.load()
    loaded = time.perf_counter() - started
    load_peak = peak_rss_mb()
    marks: dict[tuple[str, int], float] = {}

    def on_stage(stage: Stage, step: int, _total: int) -> None:
        marks[(stage.value, step)] = time.perf_counter()

    spec = ImageSpec(PROMPT, "", SIZE, SIZE, steps, 7.5, SEED, "euler_a")
    begun = time.perf_counter()
    image = backend.generate(spec, on_stage, lambda: False)
    total = time.perf_counter() - begun
    image.save(out)
    step_marks = [marks[("diffusion", i)] for i in range(steps + 1)]
    return {
        "load_s": loaded,
        "load_peak_rss_mb": load_peak,
        "steps": [b - a for a, b in itertools.pairwise(step_marks)],
        "decode_s": marks[("decoding", 1)] - marks[("decoding", 0)],
        "image_s": total,
        "architecture": backend.info().architecture,
    }


def child(kind: str, model: Path, dtype_name: str, steps: int, out: Path) -> None:
    """One configuration, in this (fresh) process; prints one JSON line."""
    run = _run_naive if kind == "naive" else _run_ours
    result = run(model, dtype_name, steps, out)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def psnr(a: Path, b: Path) -> float:
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _spawn(kind: str, model: Path, dtype_name: str, steps: int, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.real_model", "--child", kind, str(model), dtype_name]
    command += ["--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {dtype_name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", action="append", help="run only these configurations")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "DTYPE"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        kind, model, dtype_name = args.child
        child(kind, Path(model), dtype_name, args.steps, args.out)
        return

    from bench.sd15_model import ensure_sd15_model

    model = ensure_sd15_model()
    configurations = [
        (f"{kind}-{dtype_name}", kind.partition("-")[0], path, dtype_name)
        for dtype_name in ("float32", "bfloat16")
        for kind, path in (
            ("naive", model.folder),
            ("ours-folder", model.folder),
            ("ours-file", model.single_file),
        )
    ]
    with tempfile.TemporaryDirectory() as scratch:
        images: dict[str, Path] = {}
        print(
            f"SD 1.5-shaped, {SIZE}x{SIZE}, {args.steps} steps, cfg 7.5, "
            f"{os.cpu_count()} CPUs, torch threads: the process's cores"
        )
        print(
            f"{'configuration':<22} {'load s':>7} {'step s':>7} {'decode s':>9} "
            f"{'image s':>8} {'load peak MB':>13} {'peak RSS MB':>12}"
        )
        for name, kind, path, dtype_name in configurations:
            if args.only and name not in args.only:
                continue
            out = Path(scratch) / f"{name}.png"
            result = _spawn(kind, path, dtype_name, args.steps, out)
            images[name] = out
            later = result["steps"][1:] or result["steps"]
            print(
                f"{name:<22} {result['load_s']:>7.1f} {sum(later) / len(later):>7.2f} "
                f"{result['decode_s']:>9.2f} {result['image_s']:>8.1f} "
                f"{result['load_peak_rss_mb']:>13.0f} "
                f"{result['peak_rss_mb']:>12.0f}",
                flush=True,
            )
        for kind in ("naive", "ours-folder", "ours-file"):
            full, half = images.get(f"{kind}-float32"), images.get(f"{kind}-bfloat16")
            if full and half:
                print(f"PSNR bf16 vs fp32, {kind}, SD 1.5-shaped: {psnr(full, half):.1f} dB")
        builtin_psnr(Path(scratch))


def builtin_psnr(scratch: Path) -> None:
    """PSNR of bfloat16 against float32 on the built-in model, same seed, 20 steps."""
    from diffusiond.backends.base import ImageSpec
    from diffusiond.backends.builtin_model import ensure_builtin_model
    from diffusiond.backends.diffusers_backend import DiffusersBackend
    from diffusiond.settings import default_home

    folder = ensure_builtin_model(Path(os.environ.get("DIFFUSIOND_HOME") or default_home()))
    spec = ImageSpec(PROMPT, "", SIZE, SIZE, 20, 7.5, SEED, "euler_a")
    paths = []
    for dtype_name in ("float32", "bfloat16"):
        backend = DiffusersBackend(
            model_path=folder, home=folder.parent, device="cpu", torch_threads=2, dtype=dtype_name
        )
        backend.load()
        path = scratch / f"builtin-{dtype_name}.png"
        backend.generate(spec, lambda *_: None, lambda: False).save(path)
        paths.append(path)
    print(f"PSNR bf16 vs fp32, built-in model, 20 steps euler_a: {psnr(*paths):.1f} dB")


if __name__ == "__main__":
    main()
