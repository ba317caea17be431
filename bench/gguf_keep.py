"""GGUF weights kept quantized (--gguf-weights quantized) against dequantized at load.

A FLUX.1 dev-shaped transformer at the published widths (3072 wide, 24 heads of 128, T5
width 4096, pooled CLIP 768, MLP 4x) but only --double double and --single single blocks
(FLUX.1 has 19 and 38), random weights, is written in Black Forest Labs' names as a
city96-style GGUF of each --types (vectors F32, linear weights quantized). Each file is
then loaded by the component loader both ways, each load in a fresh process: the resident
memory after the load (VmRSS) and its peak (VmHWM). Then one process per type holds both
loads and times one forward each at 512x512 (64x64 latent = 1024 image tokens, 256 text
tokens) in bfloat16 on --threads threads, alternating dequantized/quantized --rounds times
(the CPUs are shared; the load average is printed).

The full model's numbers are an EXTRAPOLATION from the block counts: memory as the
measured RSS plus the missing blocks' bytes (counted from the file), time as the measured
forward scaled by the parameters the blocks hold (FLOPs of the linears go with them).

    python bench/gguf_keep.py [--types q8_0,q4_0] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/gguf_keep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL_DOUBLE, FULL_SINGLE = 19, 38
IMAGE_TOKENS, TEXT_TOKENS = 1024, 256
GIB = 1024**3


def _config(double: int, single: int) -> dict[str, Any]:
    return {
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "in_channels": 64,
        "guidance_embeds": True,
    }


def _original_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """The original (BFL) tensor names and shapes, from the module built on the meta device."""
    import torch
    from diffusers import FluxTransformer2DModel
    from tests.support.flux_layout import original_layout

    with torch.device("meta"):
        module = FluxTransformer2DModel(**_config(double, single))
    return {name: tuple(t.shape) for name, t in original_layout("flux1", module).items()}


def write_file(path: Path, kind_name: str, double: int, single: int) -> None:
    """Random weights (0.02 noise; norm scales near 1) in `kind_name` (q8_0, q4_0)."""
    import numpy as np
    from gguf import GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    wanted = GGMLQuantizationType[kind_name.upper()]
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch="flux")
    for name, shape in _original_shapes(double, single).items():
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith(".scale"):
            values += np.float32(1.0)
        if len(shape) < 2:
            writer.add_tensor(name, values, raw_dtype=GGMLQuantizationType.F32)
        elif shape[-1] % GGML_QUANT_SIZES[wanted][0]:
            writer.add_tensor(name, values.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
        else:
            writer.add_tensor(name, quantize(values, wanted), raw_dtype=wanted)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _load(path: Path, keep: bool) -> Any:
    import torch

    from diffusiond.backends.component_read import read_component
    from diffusiond.backends.transformer_flux import load_flux_layout

    tensors = read_component(path, torch.bfloat16, keep_quantized=keep)
    return load_flux_layout("flux1", tensors, torch.bfloat16, path)


def child_load(path: Path, keep: bool) -> dict[str, Any]:
    """Load once in this (fresh) process: seconds, RSS after, peak RSS."""
    start = time.perf_counter()
    module = _load(path, keep)
    seconds = time.perf_counter() - start
    kept = sum(type(m).__name__ == "GGUFLinear" for m in module.modules())
    return {
        "load_s": seconds,
        "rss_gib": _status_kib("VmRSS") / 1024**2,
        "peak_gib": _status_kib("VmHWM") / 1024**2,
        "gguf_linears": kept,
    }


def _inputs(image_tokens: int, text_tokens: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    side = int(image_tokens**0.5)
    rows = torch.arange(image_tokens) // side
    cols = torch.arange(image_tokens) % side
    bf16 = torch.bfloat16
    return {
        "hidden_states": torch.randn(1, image_tokens, 64, generator=generator).to(bf16),
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=generator).to(bf16),
        "pooled_projections": torch.randn(1, 768, generator=generator).to(bf16),
        "timestep": torch.tensor([0.5], dtype=bf16),
        "guidance": torch.tensor([3.5], dtype=bf16),
        "img_ids": torch.stack([torch.zeros(image_tokens), rows, cols], dim=1).float(),
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }


def child_time(path: Path, rounds: int, threads: int) -> dict[str, Any]:
    """Both loads in this process; forwards alternated dequantized / quantized."""
    import torch

    torch.set_num_threads(threads)
    modules = {"dequantize": _load(path, False), "quantized": _load(path, True)}
    small, full = _inputs(64, 16), _inputs(IMAGE_TOKENS, TEXT_TOKENS)
    times: dict[str, list[float]] = {mode: [] for mode in modules}
    outputs: dict[str, Any] = {}
    with torch.inference_mode():
        for module in modules.values():  # warm-up: one-time kernel and allocator setup
            module(**small)
        for _ in range(rounds):
            for mode, module in modules.items():
                start = time.perf_counter()
                outputs[mode] = module(**full)[0]
                times[mode].append(time.perf_counter() - start)
    difference = (outputs["dequantize"].float() - outputs["quantized"].float()).abs().max()
    return {
        "times": times,
        "max_abs_difference": float(difference),
        "output_abs_max": float(outputs["dequantize"].float().abs().max()),
        "load_average": os.getloadavg(),
    }


def _block_of(name: str) -> str:
    if name.startswith("double_blocks."):
        return "double"
    if name.startswith("single_blocks."):
        return "single"
    return "other"


def file_sizes(path: Path, double: int, single: int) -> dict[str, dict[str, float]]:
    """Per double block, per single block and the rest: stored bytes, bf16 bytes, values."""
    from diffusiond.backends.gguf_file import GgufFile

    out = {part: {"stored": 0.0, "bf16": 0.0, "values": 0.0} for part in ("double", "single")}
    out["other"] = {"stored": 0.0, "bf16": 0.0, "values": 0.0}
    for tensor in GgufFile(path).tensors.values():
        part = out[_block_of(tensor.name)]
        count = float(_numel(tensor.shape))
        part["stored"] += tensor.size
        part["bf16"] += 2 * count
        part["values"] += count
    for key in out["double"]:
        out["double"][key] /= double
        out["single"][key] /= single
    return out


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _run_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _extrapolated_gib(
    rss: float, sizes: dict[str, dict[str, float]], key: str, d: int, s: int
) -> float:
    extra = (FULL_DOUBLE - d) * sizes["double"][key] + (FULL_SINGLE - s) * sizes["single"][key]
    return rss + extra / GIB


def _time_scale(sizes: dict[str, dict[str, float]], d: int, s: int) -> float:
    def values(nd: int, ns: int) -> float:
        return (
            nd * sizes["double"]["values"]
            + ns * sizes["single"]["values"]
            + sizes["other"]["values"]
        )

    return values(FULL_DOUBLE, FULL_SINGLE) / values(d, s)


_HEADER = (
    f"{'mode':<11} {'load s':>7} {'RSS GiB':>8} {'peak GiB':>9} {'fwd s (each)':>22} "
    f"{'median':>7} | {'full RSS GiB*':>13} {'full fwd s*':>11}"
)


def _row(mode: str, load: dict[str, Any], each: list[float], full: tuple[float, float]) -> str:
    times = " ".join(f"{t:.2f}" for t in each)
    return (
        f"{mode:<11} {load['load_s']:>7.1f} {load['rss_gib']:>8.2f} {load['peak_gib']:>9.2f} "
        f"{times:>22} {statistics.median(each):>7.2f} | {full[0]:>13.1f} {full[1]:>11.0f}"
    )


def bench_type(kind: str, folder: Path, args: argparse.Namespace) -> None:
    d, s = args.double, args.single
    path = folder / f"flux1-{d}d{s}s-{kind}.gguf"
    if not path.is_file():
        start = time.perf_counter()
        write_file(path, kind, d, s)
        took = time.perf_counter() - start
        print(f"[{kind}] wrote {path} ({path.stat().st_size / GIB:.2f} GiB) in {took:.0f} s")
    sizes = file_sizes(path, d, s)
    loads = {mode: _run_child("load", str(path), mode) for mode in ("dequantize", "quantized")}
    timing = _run_child("time", str(path), str(args.rounds), str(args.threads))
    scale = _time_scale(sizes, d, s)
    print(f"\n== {kind.upper()}: {d} double + {s} single blocks ({FULL_DOUBLE} + {FULL_SINGLE})")
    print(f"load average during timing (1/5/15 min): {timing['load_average']}")
    difference, largest = timing["max_abs_difference"], timing["output_abs_max"]
    print(f"max |dequantized - quantized| output: {difference:.4g} (output max {largest:.3g})")
    print(_HEADER)
    medians = {}
    for mode in ("dequantize", "quantized"):
        each = timing["times"][mode]
        medians[mode] = statistics.median(each)
        key = "bf16" if mode == "dequantize" else "stored"
        full_rss = _extrapolated_gib(loads[mode]["rss_gib"], sizes, key, d, s)
        print(_row(mode, loads[mode], each, (full_rss, medians[mode] * scale)))
    ratio = medians["quantized"] / medians["dequantize"]
    print(f"quantized / dequantized forward time: {ratio:.2f}x")
    print(f"* = EXTRAPOLATED to {FULL_DOUBLE} + {FULL_SINGLE} blocks (time x{scale:.1f})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("load", "time"):
        path = Path(sys.argv[2])
        if sys.argv[1] == "load":
            print(json.dumps(child_load(path, sys.argv[3] == "quantized")))
        else:
            print(json.dumps(child_time(path, int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q8_0,q4_0")
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the files go (default: a temp dir)"
    )
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="gguf-keep-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}")
    for kind in args.types.split(","):
        bench_type(kind, folder, args)


if __name__ == "__main__":
    main()
