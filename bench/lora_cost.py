"""What a LoRA costs a request: first use, cached, and the requests without one afterwards.

The backend is called in-process (diffusiond's DiffusersBackend, as a served job calls it),
with a kohya LoRA made here that covers every attention projection of the model's UNet
(attn1 and attn2: to_q, to_k, to_v, to_out.0) and of its text encoder (q/k/v/out_proj), at
`--rank` (16: the size of a common real LoRA). For each case it reports the request's
`loading` stage (where LoRAs are applied) and its whole time, median of `--repeat`:

- none, before any LoRA: the baseline;
- first use: the file read, the adapter built and loaded;
- cached: the same LoRA again (its adapter stays loaded; only switched on);
- none, after: adapters loaded but switched off (must give the baseline's pixels);
- reloaded from memory: an adapter evicted (`max_resident` 1, two LoRAs alternating) and
  built again from the tensor cache, without reading the file.

    python -m bench.lora_cost                       # the built-in model
    python -m bench.lora_cost --model sd15 --size 256 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.jobs.models import LoraWeight, Stage
from diffusiond.settings import default_home

UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targets(module: torch.nn.Module, projections: tuple[str, ...]) -> dict[str, Any]:
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear)
        and name.endswith(projections)
        and ("attn" in name or "self_attn" in name)
    }


def write_kohya_lora(pipeline: Any, path: Path, rank: int, seed: int) -> int:
    """A kohya LoRA over every attention projection of `pipeline`; its size in bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    parts = (
        ("lora_unet_", _targets(pipeline.unet, UNET_PROJECTIONS)),
        ("lora_te_", _targets(pipeline.text_encoder, TEXT_PROJECTIONS)),
    )
    for prefix, layers in parts:
        for name, layer in layers.items():
            key = prefix + name.replace(".", "_")
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.05
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.05
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path.stat().st_size


class Timed:
    """One request: its loading stage, its whole time and its CPU time, in seconds (on one
    torch thread the CPU time is the work done, steadier than the wall time on a busy
    machine)."""

    def __init__(self, backend: DiffusersBackend, spec: ImageSpec) -> None:
        marks: dict[str, float] = {}

        def on_stage(stage: Stage, step: int, total: int) -> None:
            if stage is Stage.LOADING:
                marks[f"loading{step}"] = time.perf_counter()

        started = time.perf_counter()
        cpu_started = time.process_time()
        image = backend.generate(spec, on_stage, lambda: False)
        self.cpu_s = time.process_time() - cpu_started
        self.total_s = time.perf_counter() - started
        self.loading_s = marks["loading1"] - marks["loading0"]
        self.pixels = image.tobytes()


def _median(runs: list[Timed], field: Callable[[Timed], float]) -> float:
    return statistics.median(field(run) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("builtin", "sd15"), default="builtin")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = None
    if args.model == "sd15":
        from bench.sd15_model import ensure_sd15_model

        model_path = ensure_sd15_model().folder
    with tempfile.TemporaryDirectory() as scratch:
        loras_dir = Path(scratch)
        backend = DiffusersBackend(
            model_path=model_path,
            home=default_home(),
            device="cpu",
            torch_threads=args.threads,
            dtype=args.dtype,
            loras_dir=loras_dir,
        )
        backend.load()
        run_cases(backend, loras_dir, args)


def run_cases(backend: DiffusersBackend, loras_dir: Path, args: argparse.Namespace) -> None:
    pipeline: Any = backend._pipeline  # the bench reaches in to size the LoRA to the model
    sizes = [
        write_kohya_lora(pipeline, loras_dir / f"bench{n}.safetensors", args.rank, n)
        for n in (1, 2)
    ]

    def spec(*names: str) -> ImageSpec:
        return ImageSpec(
            "a lighthouse on a cliff at dusk",
            "",
            args.size,
            args.size,
            args.steps,
            7.0,
            1234,
            "euler_a",
            loras=tuple(LoraWeight(name, 0.8) for name in names),
        )

    def runs(*names: str, count: int = args.repeat) -> list[Timed]:
        return [Timed(backend, spec(*names)) for _ in range(count)]

    cases: dict[str, list[Timed]] = {}
    cases["none, before any LoRA"] = runs()
    cases["first use (file read, adapter built)"] = runs("bench1", count=1)
    cases["cached (adapter loaded, switched on)"] = runs("bench1")
    cases["none, after (adapters switched off)"] = runs()
    loras: Any = backend._loras
    loras._max_resident = 1  # every switch now builds the adapter again, from memory
    reads = loras.cache.reads
    alternating = [Timed(backend, spec(f"bench{1 + n % 2}")) for n in range(2 * args.repeat)]
    cases["reloaded from the tensor cache"] = alternating[1:]
    same = (
        cases["none, after (adapters switched off)"][0].pixels
        == cases["none, before any LoRA"][0].pixels
    )
    print(
        f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, {args.dtype}, "
        f"{args.threads} thread(s); LoRA rank {args.rank}, {sizes[0] / 1e6:.1f} MB"
    )
    print(f"{'case':40} {'loading ms':>11} {'request s':>10} {'CPU s':>7}")
    for name, timed in cases.items():
        loading = _median(timed, lambda run: run.loading_s) * 1000
        total = _median(timed, lambda run: run.total_s)
        print(f"{name:40} {loading:11.1f} {total:10.3f} {_median(timed, lambda r: r.cpu_s):7.3f}")
    print(f"no leak (none after == none before, pixels): {same}")
    read = loras.cache.reads - reads
    print(f"files read while alternating: {read} (bench2's first use; then none)")


if __name__ == "__main__":
    main()
