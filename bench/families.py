"""Per-step time and peak RSS of each flow-matching family's tiny model (tests/support).

For each family a fresh Python process builds (once, under --home) and loads the tiny
model through FlowBackend, draws one warm-up image, then --images images at --size px and
--steps steps (euler, cfgScale 3), timing each diffusion step from the backend's own
progress reports; it reads its peak RSS (ru_maxrss) at the end. One torch thread.

These models are a few hundred thousand parameters: the numbers measure the pipeline's
overhead per step on this machine (text encoders, packing, schedulers), not a real model.
`--source` loads the same weights from a diffusers folder (`folder`), from split component
files (`components`, tests/support/component_models.py) or with a Q8_0 GGUF diffusion
model (`gguf-q8_0`).

    python bench/families.py [--families flux1,sd3] [--size 512] [--steps 8] [--source folder]
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

if __package__ in (None, ""):  # run as `python bench/families.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import DEFAULT_HOME, ROOT, fmt, print_table


def measure(
    family: str, home: Path, size: int, steps: int, images: int, *, source: str
) -> dict[str, Any]:
    """In this process: the tiny model's load time, step times and peak RSS."""
    import torch
    from tests.support.component_models import component_folder
    from tests.support.families import tiny_family_folder

    from diffusiond.backends.base import ImageSpec
    from diffusiond.backends.components import read_manifest
    from diffusiond.backends.families import FAMILIES
    from diffusiond.backends.flow_backend import FlowBackend
    from diffusiond.jobs.models import Stage

    torch.set_num_threads(1)
    home.mkdir(parents=True, exist_ok=True)
    folder = tiny_family_folder(home, family)
    components = None
    if source != "folder":
        fmt = "safetensors" if source == "components" else source
        components = read_manifest(component_folder(home, family, fmt=fmt))
    started = time.perf_counter()
    backend = FlowBackend(
        model_path=folder,
        family=FAMILIES[family],
        device="cpu",
        torch_threads=1,
        components=components,
    )
    backend.load()
    load_s = time.perf_counter() - started
    step_times: list[float] = []
    last = [0.0]

    def on_stage(stage: Stage, current: int, _total: int) -> None:
        now = time.perf_counter()
        if stage is Stage.DIFFUSION and current > 0:
            step_times.append(now - last[0])
        last[0] = now

    def draw(seed: int, report: Any) -> None:
        spec = ImageSpec(
            prompt="a lighthouse at dusk", negative_prompt="", width=size, height=size,
            steps=steps, cfg_scale=3.0, seed=seed, sampler="euler",
        )  # fmt: skip
        backend.generate(spec, report, lambda: False)

    draw(0, lambda *_: None)
    image_times = []
    for seed in range(1, images + 1):
        started = time.perf_counter()
        draw(seed, on_stage)
        image_times.append(time.perf_counter() - started)
    return {
        "family": family,
        "dtype": backend.info().dtype,
        "load_s": load_s,
        "step_ms": statistics.median(step_times) * 1000,
        "image_s": statistics.median(image_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    from tests.support.families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--source", choices=("folder", "components", "gguf-q8_0"), default="folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(
            args.child, args.home, args.size, args.steps, args.images, source=args.source
        )
        print(json.dumps(result))
        return
    rows = []
    for family in args.families.split(","):
        command = [sys.executable, __file__, "--child", family, "--home", str(args.home)]
        command += ["--size", str(args.size), "--steps", str(args.steps)]
        command += ["--images", str(args.images), "--source", args.source]
        finished = subprocess.run(
            command, capture_output=True, text=True, cwd=ROOT, check=True, timeout=900
        )
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        rows.append(
            [
                family,
                result["dtype"],
                fmt(result["load_s"], 2),
                fmt(result["step_ms"]),
                fmt(result["image_s"], 2),
                fmt(result["peak_rss_mb"], 0),
            ]
        )
    print(f"{args.size}x{args.size}, {args.steps} steps, euler, 1 torch thread, {args.source}")
    print_table(["family", "dtype", "load s", "step ms", "image s", "peak RSS MB"], rows)


if __name__ == "__main__":
    main()
