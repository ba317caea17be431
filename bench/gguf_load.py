"""GGUF Q8_0 against .safetensors for SD 1.5-shaped weights: load time, step time, peak RSS.

The SD 1.5-shaped model (bench/sd15_model.py; float16 .safetensors, CompVis/ldm names) is
written once as a Q8_0 GGUF in stable-diffusion.cpp's layout (tests/support/gguf_files.py).
Each case runs in a fresh child process so its peak RSS is its own:

- safetensors: `load_single_file` of the .safetensors (the whole pipeline), then UNet steps;
- gguf: the same on the Q8_0 .gguf (dequantized to the compute dtype at load);
- gguf-unet / gguf-kept: the UNet alone, from the GGUF dequantized at load, and from
  diffusers' GGUF loader (GGUFQuantizationConfig), which keeps Linear weights quantized and
  dequantizes them at every call. That loader cannot run sd.cpp's quantized norm weights,
  so it reads a second file with 1-D tensors left as stored.

A step is one UNet call on a batch of 2 (classifier-free guidance) 64x64 latents (512x512).
`--layers` times instead, in one process and interleaved (so a busy machine slows both
alike), SD 1.5's largest linear layers as a plain bfloat16 Linear and as diffusers'
GGUFLinear holding Q8_0 weights.

    python bench/gguf_load.py --steps 3
    python bench/gguf_load.py --layers
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/gguf_load.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import default_threads
from bench.sd15_model import ensure_sd15_model

CASES = ("safetensors", "gguf", "gguf-unet", "gguf-kept")


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_ggufs(single_file: Path, out: Path) -> tuple[Path, Path]:
    """(sd.cpp-layout Q8_0 GGUF, the same with 1-D tensors unquantized), written if absent."""
    from safetensors.torch import load_file
    from tests.support.gguf_files import Q, write_sdcpp_gguf

    out.mkdir(parents=True, exist_ok=True)
    sdcpp, linear_only = out / "sd15-random.q8_0.gguf", out / "sd15-random.q8_0-vectors.gguf"
    for path, vectors in ((sdcpp, True), (linear_only, False)):
        if not path.is_file():
            started = time.monotonic()
            partial = path.with_suffix(".partial")
            kinds = write_sdcpp_gguf(
                load_file(str(single_file)), partial, Q.Q8_0, quantize_vectors=vectors
            )
            partial.replace(path)
            print(f"wrote {path.name} in {time.monotonic() - started:.0f} s: {dict(kinds)}")
    return sdcpp, linear_only


def _unet_of(case: str, path: Path, dtype: Any) -> Any:
    from diffusers import GGUFQuantizationConfig, UNet2DConditionModel

    from diffusiond.backends.single_file import UNET_PREFIX, Checkpoint, shipped_config

    config = str(shipped_config("sd1"))
    common = {"config": config, "subfolder": "unet", "torch_dtype": dtype}
    if case == "gguf-kept":
        quantization = GGUFQuantizationConfig(compute_dtype=dtype)
        return UNet2DConditionModel.from_single_file(
            str(path), quantization_config=quantization, local_files_only=True, **common
        )
    state = Checkpoint(path).tensors(UNET_PREFIX, dtype)
    return UNet2DConditionModel.from_single_file(state, local_files_only=True, **common)


def child(case: str, path: Path, steps: int, threads: int, dtype_name: str) -> dict[str, Any]:
    import torch

    from diffusiond.backends.single_file import load_single_file

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    baseline = _rss_mb()
    started = time.monotonic()
    if case in ("safetensors", "gguf"):
        unet = load_single_file(path, dtype=dtype)[0].unet
    else:
        unet = _unet_of(case, path, dtype)
    load_s = time.monotonic() - started
    loaded_rss, load_peak = _rss_mb(), _peak_mb()
    latents = torch.randn(2, 4, 64, 64, dtype=dtype)
    text = torch.randn(2, 77, 768, dtype=dtype)
    times = []
    with torch.inference_mode():
        for step in range(steps + 1):  # the first call warms up
            started = time.monotonic()
            unet(latents, 500 - step, text)
            times.append(time.monotonic() - started)
    return {
        "case": case,
        "load_s": load_s,
        "step_s": statistics.median(times[1:]),
        "baseline_mb": baseline,
        "loaded_rss_mb": loaded_rss,
        "load_peak_mb": load_peak,
        "peak_mb": _peak_mb(),
    }


# (out, in, tokens) of SD 1.5 UNet linears at 512x512: the first level's feed-forward
# (GEGLU in, out), its attention projection, the deepest level's feed-forward
LAYERS = ((2560, 320, 4096), (320, 1280, 4096), (320, 320, 4096), (10240, 1280, 64))


def layer_times(rounds: int, threads: int) -> None:
    import torch
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    from gguf.quants import quantize
    from tests.support.gguf_files import Q

    torch.set_num_threads(threads)
    print("layer (out x in, tokens x 2)   bf16 Linear ms   GGUFLinear Q8_0 ms   ratio")
    for out_features, in_features, tokens in LAYERS:
        weight = torch.randn(out_features, in_features) * 0.02
        plain = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
        plain.weight.data = weight.to(torch.bfloat16)
        kept = GGUFLinear(in_features, out_features, bias=False, compute_dtype=torch.bfloat16)
        blocks = torch.from_numpy(quantize(weight.numpy(), Q.Q8_0))
        kept.weight = GGUFParameter(blocks, quant_type=Q.Q8_0)
        inputs = torch.randn(2, tokens, in_features, dtype=torch.bfloat16)
        times: dict[str, list[float]] = {"plain": [], "kept": []}
        with torch.inference_mode():
            for _ in range(rounds + 1):  # the first round warms up
                for name, layer in (("plain", plain), ("kept", kept)):
                    started = time.perf_counter()
                    layer(inputs)
                    times[name].append(time.perf_counter() - started)
        plain_ms = statistics.median(times["plain"][1:]) * 1000
        kept_ms = statistics.median(times["kept"][1:]) * 1000
        shape = f"{out_features} x {in_features}, {tokens} x 2"
        print(f"{shape:<30} {plain_ms:14.1f} {kept_ms:20.1f} {kept_ms / plain_ms:7.2f}")


def interleaved_steps(files: dict[str, Path], rounds: int, threads: int) -> None:
    """The dequantized and the kept-quantized UNet in one process, stepping in turns."""
    import torch

    torch.set_num_threads(threads)
    unets = {
        case: _unet_of(case, files[case], torch.bfloat16) for case in ("gguf-unet", "gguf-kept")
    }
    latents = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    text = torch.randn(2, 77, 768, dtype=torch.bfloat16)
    times: dict[str, list[float]] = {case: [] for case in unets}
    outputs: dict[str, Any] = {}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for case, unet in unets.items():
                started = time.monotonic()
                outputs[case] = unet(latents, 500, text).sample.float()
                times[case].append(time.monotonic() - started)
    dequantized, kept = (statistics.median(times[case][1:]) for case in unets)
    difference = (outputs["gguf-unet"] - outputs["gguf-kept"]).abs().max().item()
    print(
        f"interleaved, {rounds} rounds: dequantized at load {dequantized:.2f} s/step, kept "
        f"quantized {kept:.2f} s/step ({kept / dequantized:.2f}x); largest output difference "
        f"{difference:.4f} (output std {outputs['gguf-unet'].std().item():.3f})"
    )


def run_child(case: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", case, "--path", str(path)]
    command += ["--steps", str(args.steps), "--threads", str(args.threads), "--dtype", args.dtype]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if finished.returncode:
        raise SystemExit(f"{case} failed:\n{finished.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, help="where the GGUF files go (default: by the model)")
    parser.add_argument("--layers", action="store_true", help="time single layers instead")
    parser.add_argument(
        "--interleave", action="store_true", help="step both GGUF UNets in one process, in turns"
    )
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.steps, args.threads, args.dtype)))
        return
    if args.layers:
        layer_times(max(args.steps, 5), args.threads)
        return
    model = ensure_sd15_model()
    sdcpp, linear_only = build_ggufs(model.single_file, args.out or model.single_file.parent)
    files = {"safetensors": model.single_file, "gguf": sdcpp, "gguf-unet": sdcpp}
    files["gguf-kept"] = linear_only
    if args.interleave:
        interleaved_steps(files, args.steps, args.threads)
        return
    print(f"SD 1.5-shaped, 512x512 latents, batch 2, {args.dtype}, {args.threads} threads")
    for name, path in files.items():
        print(f"  {name}: {path.name} {path.stat().st_size / 2**30:.2f} GiB")
    print("case          load s   step s   RSS after load MB   peak at load MB   peak MB")
    for case in CASES:
        row = run_child(case, files[case], args)
        print(
            f"{case:<12} {row['load_s']:7.1f} {row['step_s']:8.2f} {row['loaded_rss_mb']:15.0f} "
            f"{row['load_peak_mb']:17.0f} {row['peak_mb']:10.0f}   (baseline "
            f"{row['baseline_mb']:.0f} MB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
