"""The real server on GGUF checkpoints in stable-diffusion.cpp's layout: the same picture as
the .safetensors of the same weights, within each quant type's error."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.gguf_files import tiny_gguf_file
from tests.support.model_files import tiny_model_files
from tests.support.server import poll_until, start_server

# Euler: deterministic given the seed, so two files' pictures differ by their weights only.
DRAW = {"prompt": "a lighthouse", "width": 128, "height": 128, "steps": 12, "sampler": "euler"}
SEEDS = (7, 8, 7)  # the last repeats the first: a seed reproduces its picture


@dataclass(frozen=True)
class Served:
    health: dict[str, Any]
    pictures: list[np.ndarray]  # one per seed in SEEDS
    bodies: list[list[dict[str, Any]]]  # every poll of each job


def _picture(body: dict[str, Any]) -> np.ndarray:
    assert body["status"] == "complete", body
    png = base64.b64decode(body["result"]["images"][0]["image"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def serve_and_draw(home: Path, model: Path, dtype: str, seeds: tuple[int, ...] = SEEDS) -> Served:
    folder, _ = tiny_model_files(home)
    server = start_server(
        home, "--model", str(model), "--model-config", str(folder), "--dtype", dtype
    )
    try:
        with server.client() as client:
            health = client.get("/health").json()
            pictures, bodies = [], []
            for seed in seeds:
                job = client.post("/v1/images/generations", json={**DRAW, "seed": seed})
                assert job.status_code == 201, job.text
                seen = poll_until(client, job.json()["id"])
                pictures.append(_picture(seen[-1]))
                bodies.append(seen)
    finally:
        assert server.stop() == 0, server.text()
    return Served(health, pictures, bodies)


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    mse = float(np.mean((first - second) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class References:
    """The .safetensors checkpoint's pictures, served once per dtype the first time asked."""

    def __init__(self, home: Path) -> None:
        self._home = home
        self._served: dict[str, Served] = {}

    def at(self, dtype: str) -> Served:
        if dtype not in self._served:
            _, single_file = tiny_model_files(self._home)
            self._served[dtype] = serve_and_draw(self._home, single_file, dtype)
        return self._served[dtype]


@pytest.fixture(scope="module")
def references(model_home: Path) -> References:
    return References(model_home)


# (variant, dtype, lowest PSNR allowed in dB): F16 rounds f32 weights as bf16 does, but with
# more mantissa, so at bfloat16 it is the same model; Q8_0 errs by < 0.5 % of a block's range;
# "mixed" has 4- and 5-bit layers (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1) beside Q8_0, F16 and BF16.
CASES = [("f16", "bfloat16", 42.0), ("q8_0", "float32", 50.0), ("mixed", "float32", 40.0)]


# Two servers start in one test (the reference's and the GGUF's): slow on a busy 2-core CPU.
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("variant", "dtype", "floor"), CASES)
def test_a_gguf_file_draws_the_safetensors_picture_within_its_quantization_error(
    model_home: Path, references: References, variant: str, dtype: str, floor: float
) -> None:
    _, gguf, kinds = tiny_gguf_file(model_home, variant)
    served = serve_and_draw(model_home, gguf, dtype)
    assert served.health["model"] == str(gguf)
    assert served.health["architecture"] == "sd1"
    assert served.health["dtype"] == dtype
    reference = references.at(dtype)
    scores = [psnr(a, b) for a, b in zip(served.pictures[:2], reference.pictures[:2], strict=True)]
    shown = ", ".join(f"{score:.1f}" for score in scores)
    print(f"GGUF {variant} at {dtype} ({dict(kinds)}): PSNR {shown} dB")
    assert min(scores) >= floor, scores
    # different seeds, different pictures: the comparison is not of two blank images
    assert psnr(reference.pictures[0], reference.pictures[1]) < min(scores)
    assert np.array_equal(served.pictures[0], served.pictures[2])
    for seen in served.bodies:
        assert_progress_reported(seen)


def assert_progress_reported(seen: list[dict[str, Any]]) -> None:
    steps = [
        body["progress"]
        for body in seen
        if body["status"] == "in_progress" and body.get("progress", {}).get("stage") == "diffusion"
    ]
    assert steps, "no diffusion progress was reported"
    assert all(progress["totalSteps"] == DRAW["steps"] for progress in steps)
    current = [progress["currentStep"] for progress in steps]
    assert current == sorted(current)
