"""Image-to-image against text-to-image, and the cost of a request body carrying an image.

1. Diffusion time: txt2img and img2img at --strength (0.5) with the same steps, size and
   seed, alternated round by round on one server (built-in model unless --model), read
   from each job's own `result.timings.diffusionMs`. img2img at 0.5 runs int(steps x 0.5)
   steps, so the ratio should be near 0.5 (plus the VAE encode of the init image, which
   is counted in diffusion by diffusers' pipeline call).
2. Parse time of a ~4 MB body (a 1024x1024 noise PNG, ~3 MB, in base64): the server's own
   parse (JSON, base64, guarded reader with a full decode), in this process, and the POST
   round trip (body sent -> 201) against the server.

    python bench/img2img.py --rounds 4 --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from PIL import Image

if __package__ in (None, ""):  # run as `python bench/img2img.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._server import DEFAULT_HOME, fmt, median, print_table, start_server, stop_on_sigterm
from diffusiond.api.schemas import parse_generation_request
from diffusiond.testing.requests import poll_until

GENERATIONS = "/v1/images/generations"


def noise_png(size: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def diffusion_ms(http: httpx.Client, body: dict[str, Any]) -> float:
    response = http.post(GENERATIONS, json=body)
    response.raise_for_status()
    final = poll_until(http, response.json()["id"], timeout_s=600, interval_s=0.2)[-1]
    assert final["status"] == "complete", final
    return float(final["result"]["timings"]["diffusionMs"])


def compare_diffusion(http: httpx.Client, args: argparse.Namespace) -> None:
    common = {"prompt": "a harbour", "steps": args.steps, "seed": 1, "width": args.size}
    common["height"] = args.size
    init = base64.b64encode(noise_png(args.size)).decode()
    edit = {**common, "initImage": init, "strength": args.strength}
    diffusion_ms(http, {**common, "steps": 2})  # warm up
    text: list[float] = []
    image: list[float] = []
    for round_index in range(args.rounds):
        order = [(text, common), (image, edit)]
        for times, body in order if round_index % 2 == 0 else order[::-1]:
            times.append(diffusion_ms(http, body))
    rows = [
        [str(i + 1), fmt(t, 0), fmt(e, 0), fmt(e / t, 3)]
        for i, (t, e) in enumerate(zip(text, image, strict=True))
    ]
    print(f"\n{args.size}x{args.size}, {args.steps} steps, img2img strength {args.strength}")
    print_table(["round", "txt2img ms", "img2img ms", "ratio"], rows)
    print(f"median ratio img2img/txt2img: {median(image) / median(text):.3f}")


def body_parse(http: httpx.Client, rounds: int) -> None:
    png = noise_png(1024)
    body = orjson.dumps({"prompt": "a harbour", "initImage": base64.b64encode(png).decode()})
    parse_s = []
    for _ in range(rounds):
        started = time.perf_counter()
        parse_generation_request(body, max_batch=5)
        parse_s.append(time.perf_counter() - started)
    post_s = []
    for _ in range(rounds):
        started = time.perf_counter()
        response = http.post(
            GENERATIONS, content=body, headers={"content-type": "application/json"}
        )
        post_s.append(time.perf_counter() - started)
        response.raise_for_status()
        http.delete(f"{GENERATIONS}/{response.json()['id']}")
    print(f"\nbody: {len(body) / 1e6:.2f} MB (PNG {len(png) / 1e6:.2f} MB, 1024x1024)")
    print(
        f"parse in-process: median {median(parse_s) * 1000:.1f} ms, min {min(parse_s) * 1000:.1f}"
    )
    print(f"POST -> 201 round trip: median {median(post_s) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    stop_on_sigterm()
    extra = ["--max-queue", "8"]
    with (
        start_server(home=args.home, torch_threads=args.threads, extra_args=extra) as server,
        server.client(timeout_s=600) as http,
    ):
        compare_diffusion(http, args)
        body_parse(http, args.rounds)


if __name__ == "__main__":
    main()
