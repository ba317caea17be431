"""The same SD 1.5-shaped job three ways, for side-by-side benchmarks.

- `plain`: a diffusers script (`StableDiffusionPipeline.from_pretrained`, then `pipe(...)`)
  in a child process, on its main thread;
- `backend`: diffusiond's backend called directly, in a child process, on its main thread;
- `served`: a real `diffusiond serve` subprocess, the job POSTed and polled over HTTP.

Each side stays loaded between jobs, so jobs can alternate (A, B, A, B, ...) on a shared,
noisy machine. Every job reports its mean step time (the diffusion stage over its steps),
its VAE decode time, its process's peak RSS (VmHWM) and its minor page faults, and saves
its PNG for PSNR. Work per job: a UNet step with CFG at 512x512 is 1,354 GFLOP, the decode
2,480 GFLOP; the machine's bf16 matmul peak on 2 threads is 1,720 GFLOPS.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench._server import Server, start_server
from diffusiond.testing.harness import server_env

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SIZE = 512
CFG = 7.5
SAMPLER = "euler_a"
STEP_GFLOP = 1354.0
DECODE_GFLOP = 2480.0
PEAK_GFLOPS = 1720.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class JobTimes:
    step_s: float
    decode_s: float
    image_s: float
    peak_rss_mb: float
    minor_faults: int

    @staticmethod
    def from_json(body: dict[str, Any]) -> JobTimes:
        return JobTimes(**{k: body[k] for k in JobTimes.__dataclass_fields__})


def tflops(gflop: float, seconds: float) -> str:
    achieved = gflop / seconds / 1000
    return f"{achieved:.2f} TFLOPS ({100 * achieved * 1000 / PEAK_GFLOPS:.0f} % of peak)"


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def minor_faults(pid: int | str = "self") -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[7])


def psnr(a: Path, b: Path) -> float:
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# -- the child processes ---------------------------------------------------------------


def _plain_runner(folder: Path, dtype_name: str) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    from diffusiond.backends.samplers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder),
        torch_dtype=getattr(torch, dtype_name),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = make_scheduler(SAMPLER, pipe.scheduler.config)  # the served sampler
    pipe.set_progress_bar_config(disable=True)
    original_decode = pipe.vae.decode
    marks: dict[str, float] = {}

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        marks["decode"] = time.perf_counter()
        result = original_decode(*args, **kwargs)
        marks["decoded"] = time.perf_counter()
        return result

    pipe.vae.decode = timed_decode

    def run(steps: int, seed: int, out: Path) -> tuple[float, float]:
        def on_step(_p: Any, index: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            marks.setdefault("first_step", time.perf_counter())
            return tensors

        marks.clear()
        embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True, None)
        marks["diffusion"] = time.perf_counter()
        image = pipe(
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            width=SIZE,
            height=SIZE,
            num_inference_steps=steps,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=on_step,
        ).images[0]
        image.save(out)
        step_s = (marks["decode"] - marks["diffusion"]) / steps
        return step_s, marks["decoded"] - marks["decode"]

    return run


def _backend_runner(folder: Path, dtype_name: str, threads: int, contiguous: bool) -> Any:
    from diffusiond.backends.base import ImageSpec
    from diffusiond.backends.diffusers_backend import DiffusersBackend
    from diffusiond.jobs.models import Stage

    backend = DiffusersBackend(
        model_path=folder,
        home=folder.parent,
        device="cpu",
        torch_threads=threads,
        dtype=dtype_name,
        channels_last=not contiguous,
    )
    backend.load()

    def run(steps: int, seed: int, out: Path) -> tuple[float, float]:
        marks: dict[tuple[str, int], float] = {}

        def on_stage(stage: Stage, step: int, _total: int) -> None:
            marks[(stage.value, step)] = time.perf_counter()

        spec = ImageSpec(PROMPT, "", SIZE, SIZE, steps, CFG, seed, SAMPLER)
        backend.generate(spec, on_stage, lambda: False).save(out)
        step_s = (marks[("diffusion", steps)] - marks[("diffusion", 0)]) / steps
        return step_s, marks[("decoding", 1)] - marks[("decoding", 0)]

    return run


def child_main(kind: str, folder: Path, dtype_name: str, threads: int, contiguous: bool) -> None:
    """Serve jobs read from stdin (one JSON line each), one JSON line of times per job."""
    import torch

    torch.set_num_threads(threads)
    if kind == "plain":
        run = _plain_runner(folder, dtype_name)
    else:
        run = _backend_runner(folder, dtype_name, threads, contiguous)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        faults = minor_faults()
        begun = time.perf_counter()
        step_s, decode_s = run(job["steps"], job["seed"], Path(job["out"]))
        times = JobTimes(
            step_s, decode_s, time.perf_counter() - begun, peak_rss_mb(), minor_faults() - faults
        )
        print(json.dumps(times.__dict__), flush=True)


class Child:
    """A `child_main` process: loads once, then runs the jobs it is sent."""

    def __init__(
        self, kind: str, folder: Path, dtype_name: str, threads: int, contiguous: bool = False
    ) -> None:
        command = [sys.executable, "-m", "bench._sd15_jobs", kind, str(folder), dtype_name]
        command += [str(threads), "contiguous" if contiguous else "default"]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=server_env(inherit_settings=True),
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                body: dict[str, Any] = json.loads(line)
                return body
        raise RuntimeError(f"child ended with {self.process.wait()}")

    def run(self, steps: int, seed: int, out: Path) -> JobTimes:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"steps": steps, "seed": seed, "out": str(out)}))
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return JobTimes.from_json(self._read())

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Served:
    """A `diffusiond serve` subprocess on the folder; jobs POSTed and polled every 0.5 s."""

    def __init__(self, folder: Path, dtype_name: str, threads: int, *extra: str) -> None:
        args = ["--model", str(folder), "--dtype", dtype_name, *extra]
        self.server: Server = start_server(
            home=folder.parent, torch_threads=threads, extra_args=args, ready_timeout_s=900
        )
        self.client = httpx.Client(base_url=self.server.url, timeout=60)

    def run(self, steps: int, seed: int, out: Path, *, timeout_s: float = 1800) -> JobTimes:
        faults = minor_faults(self.server.pid)
        body = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": steps, "seed": seed}
        body |= {"cfgScale": CFG, "sampler": SAMPLER}
        job = self.client.post("/v1/images/generations", json=body).json()
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.client.get(f"/v1/images/generations/{job['id']}").json()
            if state["status"] != "pending" and state["status"] != "in_progress":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job['id']} did not finish in {timeout_s} s")
            time.sleep(0.5)
        if state["status"] != "complete":
            raise RuntimeError(f"served job ended {state['status']}: {state.get('error')}")
        result = state["result"]
        out.write_bytes(base64.b64decode(result["images"][0]["image"]))
        timings = result["timings"]
        return JobTimes(
            timings["diffusionMs"] / 1000 / steps,
            timings["decodingMs"] / 1000,
            result["timeTaken"] / 1000,
            peak_rss_mb(self.server.pid),
            minor_faults(self.server.pid) - faults,
        )

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


def ratio_range(slow: list[float], fast: list[float]) -> str:
    """The median of the per-round ratios slow/fast, with their range."""
    ratios = sorted(a / b for a, b in zip(slow, fast, strict=True))
    middle = ratios[len(ratios) // 2]
    return f"{middle:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f})"


Runner = Any  # Child or Served: `.run(steps, seed, out) -> JobTimes`


def alternate(
    sides: dict[str, Runner], rounds: int, steps: int, seed: int, scratch: Path
) -> tuple[dict[str, JobTimes], dict[str, list[JobTimes]]]:
    """One warm-up job per side, then `rounds` rounds of one job per side, in turn."""
    first = {
        name: side.run(steps, seed, scratch / f"{name}-warm.png") for name, side in sides.items()
    }
    for name, times in first.items():
        print(f"warm-up {name:<10} image {times.image_s:6.1f} s", flush=True)
    results: dict[str, list[JobTimes]] = {name: [] for name in sides}
    print(
        f"{'round':>5} {'side':<10} {'step s':>7} {'decode s':>9} {'image s':>8} "
        f"{'peak RSS MB':>12} {'page faults':>12}"
    )
    for index in range(rounds):
        order = list(sides.items()) if index % 2 == 0 else list(reversed(sides.items()))
        for name, side in order:
            times = side.run(steps, seed, scratch / f"{name}.png")
            results[name].append(times)
            print(
                f"{index + 1:>5} {name:<10} {times.step_s:>7.2f} {times.decode_s:>9.2f} "
                f"{times.image_s:>8.1f} {times.peak_rss_mb:>12.0f} {times.minor_faults:>12}",
                flush=True,
            )
    return first, results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    child_main(
        sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "contiguous"
    )
