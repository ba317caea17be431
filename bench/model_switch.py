"""What a model switch costs a served job, and whether memory comes back after one.

A real `diffusiond serve` with a models dir of two models shaped like the built-in one
(tests/support/model_dir.py: `alpha`, a diffusers folder, and `beta`, one .safetensors
file; built-in-sized, so the load times are those of a small model: a real SD 1.5 reads
~2-4 GB more). Each round draws the same small job on builtin, alpha, beta, alpha again
(no switch with two loaded) and builtin again, reading for each its `timings.loadingMs`
(the switch is loaded inside the job) and the server's VmRSS after it. With
--max-loaded-models 1 every change of model is a switch; the RSS after each return to
builtin shows whether memory comes back to where it was.

    python bench/model_switch.py --rounds 5 --max-loaded 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/model_switch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["HF_HUB_OFFLINE"] = "1"

import httpx
from tests.support.model_dir import two_model_dir

from bench._server import DEFAULT_HOME, median, print_table, start_server, stop_on_sigterm
from diffusiond.backends.builtin_model import ensure_builtin_model
from diffusiond.testing.requests import poll_until

JOB = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 4, "seed": 3}
SEQUENCE = (None, "alpha", "beta", "alpha", None)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def draw(http: httpx.Client, model: str | None) -> dict[str, Any]:
    body = {**JOB, **({"model": model} if model else {})}
    response = http.post("/v1/images/generations", json=body)
    response.raise_for_status()
    final = poll_until(http, response.json()["id"], timeout_s=600, interval_s=0.05)[-1]
    if final["status"] != "complete":
        raise SystemExit(f"job failed: {final}")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-loaded", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args()
    stop_on_sigterm()
    models_dir = two_model_dir(args.home, Path(tempfile.mkdtemp(prefix="bench-models-")))
    extra = [
        "--models-dir",
        str(models_dir),
        "--model-config",
        str(ensure_builtin_model(args.home)),
        "--max-loaded-models",
        str(args.max_loaded),
    ]
    rows: list[list[str]] = []
    loads: dict[str, list[int]] = {}
    builtin_rss: list[float] = []
    with start_server(home=args.home, torch_threads=args.threads, extra_args=extra) as server:
        pid = server.process.pid
        with server.client(timeout_s=60) as http:
            draw(http, None)  # kernels built once, as in any served process
            start_rss = rss_mb(pid)
            for round_number in range(1, args.rounds + 1):
                for step, model in enumerate(SEQUENCE):
                    final = draw(http, model)
                    loading = int(final["result"]["timings"]["loadingMs"])
                    name = model or "builtin"
                    key = f"{step}:{name}"
                    loads.setdefault(key, []).append(loading)
                    rss = rss_mb(pid)
                    if step == len(SEQUENCE) - 1:
                        builtin_rss.append(rss)
                    loaded = http.get("/health").json().get("loadedModels")
                    rows.append(
                        [str(round_number), name, str(loading), f"{rss:.0f}", ",".join(loaded)]
                    )
    print_table(["round", "model", "loadingMs", "RSS MB", "loaded after"], rows)
    print(f"\nmax loaded models {args.max_loaded}; RSS after the warm-up job {start_rss:.0f} MB")
    for key, values in loads.items():
        print(f"  step {key:<10} loadingMs median {median(values):.0f}  (all: {values})")
    print(
        f"  RSS back on builtin after each round: {[round(v) for v in builtin_rss]} MB "
        f"(first {builtin_rss[0] - start_rss:+.0f} MB, last {builtin_rss[-1] - start_rss:+.0f} MB "
        "against the warm-up)"
    )


if __name__ == "__main__":
    main()
