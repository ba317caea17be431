"""How much memory each flow-matching family needs: exact weight counts, and one measured step.

Part 1 (no memory, seconds): each family's transformer, text encoders and VAE are built at
their published sizes on the meta device (shapes only, no storage) from the classes diffusers
and transformers load them with, and their parameters counted exactly. Bytes are given at
bfloat16 (2 bytes a weight), GGUF Q8_0 (8.5 bits) and Q4_0 (4.5 bits); as GGUF files do, the
quantized rows keep 1-d tensors (norms, biases) at float32. The sizes come from the models'
config.json files as published on the Hugging Face Hub (found through the diffusers docs and
copies of the configs); a size that is not from a config.json is marked as an assumption.

Part 2 (--measure, minutes, several GB): only for families whose bfloat16 transformer is
under 6 GB, each in a fresh process at 2 torch threads: build the transformer with random
bfloat16 weights, then one transformer forward at 512 x 512 (one step); the peak RSS and the
seconds of each. The FLUX/SD3 VAE (the same shape) is measured the same way decoding 512 x
512 and 1024 x 1024, which is what backends/offload.py's per-pixel working memory is about.
The load average is printed with it: other processes share the CPUs.

    python bench/family_memory.py             # the tables
    python bench/family_memory.py --measure   # and the measurements (run once, machine idle)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/family_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from bench._family_sizes import FAMILIES, FLUX_VAE, SD35_MEDIUM, Builder
from diffusiond.backends.offload import GIB, working_bytes

MEASURE_UNDER_BYTES = 6 * 10**9


# -- counting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    params: int
    vector_params: int  # in 1-d tensors: kept at float32 in a GGUF file

    def bf16(self) -> int:
        return self.params * 2

    def gguf(self, bits: float) -> int:
        matrices = self.params - self.vector_params
        return int(matrices * bits / 8) + self.vector_params * 4


def count(build: Builder) -> Count:
    """Exact counts of a module built on the meta device: its parameters (shared ones once)
    and its buffers, which are loaded and moved with it (SD 3.5's positional embedding is a
    buffer of 226 M values, stored in its checkpoint)."""
    import torch

    with torch.device("meta"):
        module = build()
    tensors = [*module.parameters(), *module.buffers()]
    vectors = sum(t.numel() for t in tensors if t.dim() < 2)
    return Count(sum(t.numel() for t in tensors), vectors)


def total(counts: dict[str, Count]) -> Count:
    return Count(
        sum(c.params for c in counts.values()), sum(c.vector_params for c in counts.values())
    )


def gb(value: float) -> str:
    return f"{value / 10**9:.2f}"


def weights_table() -> tuple[list[str], dict[str, dict[str, Count]]]:
    lines = [
        "| family | module | weights (parameters + buffers) | bf16 GB | Q8_0 GB | Q4_0 GB | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    counts: dict[str, dict[str, Count]] = {}
    for family, parts in FAMILIES.items():
        counts[family] = {}
        for part in parts:
            c = count(part.build)
            counts[family][part.role] = c
            lines.append(
                f"| {family} | {part.role} | {c.params:,} | {gb(c.bf16())} | "
                f"{gb(c.gguf(8.5))} | {gb(c.gguf(4.5))} | {part.note} |"
            )
        every = total(counts[family])
        lines.append(
            f"| **{family}** | **all** | **{every.params:,}** | **{gb(every.bf16())}** | "
            f"**{gb(every.gguf(8.5))}** | **{gb(every.gguf(4.5))}** | |"
        )
    return lines, counts


def fit_table(counts: dict[str, dict[str, Count]]) -> list[str]:
    """What --offload auto needs on a GPU, from backends/offload.py's formula."""
    working = working_bytes(1024 * 1024)
    lines = [
        f"| family | host RAM, bf16 weights GiB | GPU for offload none GiB | "
        f"GPU for offload model GiB | (working memory at 1024x1024: {working / GIB:.1f} GiB) |",
        "|---|---:|---:|---:|---|",
    ]
    for family, parts in counts.items():
        weights = total(parts).bf16()
        largest_role = max(parts, key=lambda role: parts[role].bf16())
        largest = parts[largest_role].bf16()
        lines.append(
            f"| {family} | {weights / GIB:.1f} | {(weights + working) / GIB:.1f} | "
            f"{(largest + working) / GIB:.1f} | largest: {largest_role} |"
        )
    return lines


# -- measuring (each in a fresh process) -----------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_child(what: str) -> dict[str, Any]:
    """In this process: build `what` with random bf16 weights, run it once, and read RSS."""
    import diffusers  # imported before the first reading: its own memory is not the model's
    import torch

    del diffusers
    torch.set_num_threads(2)
    torch.manual_seed(0)
    start_rss = rss_bytes()
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # built straight in bf16: no float32 copy
    module = (SD35_MEDIUM if what == "transformer" else FLUX_VAE)().eval()
    torch.set_default_dtype(torch.float32)
    load_s = time.perf_counter() - started
    loaded_rss = rss_bytes()
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    started = time.perf_counter()
    with torch.inference_mode():
        if what == "transformer":  # 512 x 512: 64 x 64 latents, 1024 patches; 77 + 256 text
            module(
                hidden_states=torch.randn(1, 16, 64, 64, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 333, 4096, dtype=torch.bfloat16),
                pooled_projections=torch.randn(1, 2048, dtype=torch.bfloat16),
                timestep=torch.tensor([500.0]),
            )
        else:
            side = int(what.removeprefix("vae")) // 8
            module.decode(torch.randn(1, 16, side, side, dtype=torch.bfloat16))
    return {
        "what": what,
        "weights": weights,
        "start_rss": start_rss,
        "loaded_rss": loaded_rss,
        "peak_rss": peak_rss_bytes(),
        "load_s": load_s,
        "run_s": time.perf_counter() - started,
    }


def measure(counts: dict[str, dict[str, Count]]) -> list[str]:
    small = [f for f, parts in counts.items() if parts["transformer"].bf16() < MEASURE_UNDER_BYTES]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2 torch threads, "
        f"{os.cpu_count()} CPUs, load average before: {load}; families with a bf16 "
        f"transformer under 6 GB: {', '.join(small)}",
        "",
        "| what | weights GB | RSS after build GB | peak RSS GB | working (peak - built) GB "
        "| build s | run s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    runs = (
        [("SD 3.5 medium transformer, one step at 512x512", "transformer")]
        if "SD 3.5 medium" in small
        else []
    )
    runs += [
        ("FLUX/SD3 VAE decode 512x512", "vae512"),
        ("FLUX/SD3 VAE decode 1024x1024", "vae1024"),
    ]
    for label, what in runs:
        printed = subprocess.run(
            [sys.executable, __file__, "--child", what], capture_output=True, text=True, check=True
        ).stdout
        result = json.loads(printed.strip().splitlines()[-1])
        working = result["peak_rss"] - result["loaded_rss"]
        lines.append(
            f"| {label} | {gb(result['weights'])} | {gb(result['loaded_rss'])} | "
            f"{gb(result['peak_rss'])} | {gb(working)} | {result['load_s']:.1f} | "
            f"{result['run_s']:.1f} |"
        )
    lines.append(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="weights and measured memory of each family")
    parser.add_argument("--measure", action="store_true", help="also run the measurements")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(args.child)))
        return
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    lines, counts = weights_table()
    print("\n".join(lines))
    print()
    print("\n".join(fit_table(counts)))
    if args.measure:
        print()
        print("\n".join(measure(counts)))


if __name__ == "__main__":
    main()
