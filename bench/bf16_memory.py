"""bfloat16 memory: resident-memory growth over many distinct image sizes, per configuration.

A fast, in-process stand-in for the soak's memory check (bench/soak.py draws 625 sizes). For
each configuration a fresh Python process loads the built-in model through DiffusersBackend,
draws --warmup images of distinct sizes, reads its RSS, then draws --sizes images of further
distinct sizes (the same sizes, in the same order, for every configuration; 64..512 px in
multiples of 8, --steps steps, cfgScale 7.5, euler), trimming the heap after each as the
engine does, and reads its RSS again. Growth = the second RSS minus the first.

Besides RSS it reads where the memory went: glibc's live heap bytes (mallinfo2's uordblks +
hblkhd: memory the program still holds, not free blocks malloc keeps) and the resident
executable anonymous mappings (JIT code). The configurations run in turn, --rounds times,
alternating, because the machine's CPUs are shared and timings drift; a time ratio is taken
against "torch" (PyTorch's own defaults) within the same round.

SUMMARY: the configuration diffusiond ships ("diffusiond") against the soak's bar (< 50 MB
growth after the warm-up) and a time per image no more than 10 % over "torch".

    python bench/bf16_memory.py --rounds 2 [--configs torch,diffusiond,float32]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/bf16_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import DEFAULT_HOME, ROOT, fmt, print_table

MAX_GROWTH_MB = 50.0
MAX_TIME_RATIO = 1.10
RESULT_PREFIX = "RESULT "
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
TORCH_DEFAULTS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}


@dataclass(frozen=True)
class Config:
    key: str
    what: str
    env: dict[str, str] = field(default_factory=dict)
    child_args: tuple[str, ...] = ()  # --dtype, --channels-last, --bounded
    needs: Path | None = None  # a library that must exist for this row to run


def _capped(entries: int) -> dict[str, str]:
    return dict.fromkeys(TORCH_DEFAULTS, str(entries))


CONFIGS = (
    Config("torch", "bf16, PyTorch's defaults (both caches 1024)", TORCH_DEFAULTS),
    Config(
        "diffusiond",
        "bf16, memory.bound_kernel_caches() (the server's start-up)",
        child_args=("--bounded",),
    ),
    Config("float32", "float32, PyTorch's defaults", TORCH_DEFAULTS, ("--dtype", "float32")),
    Config(
        "nocache",
        "bf16, oneDNN cache 0, ideep cache 1",
        {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"},
    ),
    Config(
        "onednn0",
        "bf16, oneDNN cache 0, ideep 1024",
        {**TORCH_DEFAULTS, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
    ),
    Config(
        "ideep1", "bf16, oneDNN 1024, ideep cache 1", {**TORCH_DEFAULTS, "LRU_CACHE_CAPACITY": "1"}
    ),
    Config("cap64", "bf16, both caches 64", _capped(64)),
    Config("cap128", "bf16, both caches 128", _capped(128)),
    Config(
        "split256",
        "bf16, oneDNN cache 256, ideep cache 1",
        {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "1"},
    ),
    Config(
        "split512",
        "bf16, oneDNN cache 512, ideep cache 1",
        {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512", "LRU_CACHE_CAPACITY": "1"},
    ),
    Config("cap256", "bf16, both caches 256", _capped(256)),
    Config("cap512", "bf16, both caches 512", _capped(512)),
    Config(
        "jemalloc",
        "bf16, PyTorch's defaults, jemalloc preloaded",
        {
            **TORCH_DEFAULTS,
            "LD_PRELOAD": str(JEMALLOC),
            "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0",
        },
        needs=JEMALLOC,
    ),
    Config(
        "tcmalloc",
        "bf16, PyTorch's defaults, tcmalloc preloaded",
        {**TORCH_DEFAULTS, "LD_PRELOAD": str(TCMALLOC)},
        needs=TCMALLOC,
    ),
    Config(
        "chlast",
        "bf16, PyTorch's defaults, UNet and VAE channels-last",
        TORCH_DEFAULTS,
        ("--channels-last",),
    ),
)
DEFAULT_CONFIGS = ",".join((
    *("torch", "diffusiond", "float32", "nocache", "onednn0", "ideep1", "cap64", "cap128"),
    *("cap256", "cap512", "split256", "split512", "jemalloc", "tcmalloc", "chlast"),
))  # fmt: skip

# -- the child: one configuration in a fresh process --------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
            *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
        )
    ]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _heap_used_mb() -> float:
    """Live bytes glibc malloc hands out (0 under another allocator, which mallinfo2 misses)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0.0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return float(info.uordblks + info.hblkhd) / 2**20


def _exec_anon_mb() -> float:
    """Resident executable anonymous mappings: JIT-compiled code outside the heap."""
    total_kb, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            counting = len(parts) == 5 and "x" in parts[1]  # no path: anonymous
        elif counting and parts[0] == "Rss:":
            total_kb += int(parts[1])
    return total_kb / 1024


def _sample() -> dict[str, float]:
    return {"rss": _rss_mb(), "heap": _heap_used_mb(), "jit": _exec_anon_mb()}


def draw_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < count:
        size = (rng.randrange(64, 513, 8), rng.randrange(64, 513, 8))
        if size not in sizes:
            sizes.append(size)
    return sizes


def _timed_draw(backend: Any, size: tuple[int, int], seed: int, steps: int) -> float:
    """Seconds to draw one image of `size`, then trim the heap as the engine does."""
    from diffusiond.backends.base import ImageSpec
    from diffusiond.memory import trim_heap

    spec = ImageSpec("a lighthouse", "", size[0], size[1], steps, 7.5, seed, "euler")
    started = time.perf_counter()
    backend.generate(spec, lambda *_: None, lambda: False)
    trim_heap()
    return time.perf_counter() - started


def _load(args: argparse.Namespace) -> Any:
    if args.bounded:
        from diffusiond.memory import bound_kernel_caches

        bound_kernel_caches()
    import torch

    from diffusiond.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(
        model_path=None,
        home=args.home,
        device="cpu",
        torch_threads=args.threads,
        dtype=args.dtype,
    )
    backend.load()
    if args.channels_last:
        pipeline: Any = backend._pipeline
        for model in (pipeline.unet, pipeline.vae):
            model.to(memory_format=torch.channels_last)
    return backend


def run_child(args: argparse.Namespace) -> None:
    backend = _load(args)
    sizes = draw_sizes(args.warmup + args.sizes, args.seed)
    for n, size in enumerate(sizes[: args.warmup]):
        _timed_draw(backend, size, n, args.steps)
    warm = _sample()
    new_sizes = enumerate(sizes[args.warmup :], start=args.warmup)
    seconds = [_timed_draw(backend, size, n, args.steps) for n, size in new_sizes]
    result = {
        "samples": {"warm": warm, "end": _sample()},
        "mean_s": statistics.fmean(seconds),
        "repeat_s": 0.0,
    }
    repeats = []
    for n, size in enumerate(sizes[-args.repeats :] if args.repeats else []):
        _timed_draw(backend, size, n, args.steps)  # the second may reuse the first's kernels
        repeats.append(_timed_draw(backend, size, n, args.steps))
    if repeats:
        result["repeat_s"] = statistics.fmean(repeats)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -- the parent: every configuration, alternating --------------------------------------------


def run_config(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", **config.env}
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", *config.child_args,
        "--warmup", str(args.warmup), "--sizes", str(args.sizes), "--steps", str(args.steps),
        "--seed", str(args.seed), "--repeats", str(args.repeats), "--threads", str(args.threads),
        "--home", str(args.home),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line.removeprefix(RESULT_PREFIX))
            return result
    raise RuntimeError(f"{config.key} gave no result (exit {done.returncode}):\n{done.stderr}")


def _growth(result: dict[str, Any], what: str) -> float:
    samples = result["samples"]
    return float(samples["end"][what] - samples["warm"][what])


def report(configs: list[Config], results: dict[str, list[dict[str, Any]]], sizes: int) -> bool:
    base = results.get("torch")
    rows = []
    for config in configs:
        runs = results[config.key]
        ratios = [run["mean_s"] / ref["mean_s"] for run, ref in zip(runs, base or [], strict=False)]
        rep_ratios = [
            run["repeat_s"] / ref["repeat_s"]
            for run, ref in zip(runs, base or [], strict=False)
            if ref["repeat_s"]
        ]
        rows.append([
            config.key,
            fmt(statistics.median(r["samples"]["warm"]["rss"] for r in runs), 0),
            fmt(statistics.median(_growth(r, "rss") for r in runs)),
            fmt(statistics.median(_growth(r, "heap") for r in runs)),
            fmt(statistics.median(_growth(r, "jit") for r in runs)),
            fmt(statistics.median(r["mean_s"] for r in runs), 3),
            fmt(statistics.median(ratios), 2) if ratios else "-",
            fmt(statistics.median(r["repeat_s"] for r in runs), 3),
            fmt(statistics.median(rep_ratios), 2) if rep_ratios else "-",
            config.what,
        ])  # fmt: skip
    print_table(
        ["config", "RSS warm MB", "growth MB", "heap MB", "JIT MB", "s/new size", "vs torch",
         "s/same size", "vs torch", "what"],
        rows,
    )  # fmt: skip
    if "diffusiond" not in results or base is None:
        print("SUMMARY: needs the torch and diffusiond configurations")
        return False
    ours = results["diffusiond"]
    growth = statistics.median(_growth(r, "rss") for r in ours)
    ratio = statistics.median(r["mean_s"] / b["mean_s"] for r, b in zip(ours, base, strict=True))
    passed = growth < MAX_GROWTH_MB and ratio <= MAX_TIME_RATIO
    print(
        f"SUMMARY: {'PASS' if passed else 'FAIL'}: diffusiond's bf16 RSS growth {growth:.1f} MB "
        f"over {sizes} new sizes (bar < {MAX_GROWTH_MB:.0f}), "
        f"torch's {statistics.median(_growth(r, 'rss') for r in base):.1f} MB; "
        f"time per image {ratio:.2f}x torch's (bar <= {MAX_TIME_RATIO:.2f})"
    )
    return passed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"({DEFAULT_CONFIGS})")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10, help="distinct sizes first (10)")
    parser.add_argument("--sizes", type=int, default=60, help="distinct sizes measured (60)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=8, help="then this many sizes twice each, timed (8)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bounded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _runnable(config: Config) -> bool:
    return config.needs is None or config.needs.exists()


def main() -> int:
    args = parse_args()
    if args.child:
        run_child(args)
        return 0
    wanted = args.configs.split(",")
    by_key = {config.key: config for config in CONFIGS}
    unknown = [key for key in wanted if key not in by_key]
    if unknown:
        sys.exit(f"unknown configurations: {', '.join(unknown)} (known: {', '.join(by_key)})")
    configs = [by_key[key] for key in wanted if _runnable(by_key[key])]
    results: dict[str, list[dict[str, Any]]] = {config.key: [] for config in configs}
    for round_number in range(args.rounds):
        order = configs if round_number % 2 == 0 else configs[::-1]
        for config in order:
            result = run_config(config, args)
            results[config.key].append(result)
            print(
                f"round {round_number + 1} {config.key}: growth "
                f"{_growth(result, 'rss'):.1f} MB, {result['mean_s']:.3f} s/image",
                flush=True,
            )
    return 0 if report(configs, results, args.sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
