"""Channels-last and --compile on the built-in model: applied, same pictures, served."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusiond.backends.acceleration import conv_weights_channels_last, inductor_cache_dir
from diffusiond.backends.base import ImageSpec
from diffusiond.backends.diffusers_backend import DiffusersBackend
from tests.support.server import poll_until, start_server

SPEC = ImageSpec(
    prompt="a lighthouse on a cliff",
    negative_prompt="",
    width=128,
    height=128,
    steps=4,
    cfg_scale=7.5,
    seed=42,
    sampler="euler_a",
)

# bfloat16 against float32 on the same seed gives 49 dB on this model; a memory format
# only reorders the same arithmetic, so it must stay at least this close to contiguous.
MIN_PSNR_DB = 35.0


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _backend(home: Path, *, channels_last: bool) -> DiffusersBackend:
    backend = DiffusersBackend(
        model_path=None,
        home=home,
        device="cpu",
        torch_threads=1,
        dtype="bfloat16",
        channels_last=channels_last,
    )
    backend.load()
    return backend


def _draw(backend: DiffusersBackend) -> np.ndarray:
    return np.asarray(backend.generate(SPEC, lambda *_: None, lambda: False))


def test_channels_last_is_applied_and_draws_the_contiguous_picture(model_home: Path) -> None:
    fast = _backend(model_home, channels_last=True)
    plain = _backend(model_home, channels_last=False)
    for name in ("unet", "vae"):
        assert conv_weights_channels_last(getattr(fast._pipeline, name)), name
        assert not conv_weights_channels_last(getattr(plain._pipeline, name)), name
    image, reference = _draw(fast), _draw(plain)
    assert image.shape == reference.shape == (128, 128, 3)
    assert reference.std() > 0
    assert psnr_db(image, reference) >= MIN_PSNR_DB


def test_compile_marks_the_unet_only_and_points_the_cache_at_home(
    model_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor-default")
    backend = DiffusersBackend(
        model_path=None, home=model_home, device="cpu", torch_threads=1, compile_model=True
    )
    backend.load()  # compiling happens at the first call, not here
    pipeline = backend._pipeline
    assert pipeline.unet._compiled_call_impl is not None
    assert pipeline.vae.decoder._compiled_call_impl is None  # eager measured faster
    assert pipeline.text_encoder._compiled_call_impl is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(inductor_cache_dir(model_home))


# SLOW, opt-in: inductor compiling even the tiny model takes minutes on this project's
# 2 shared cores (over 10 under load), too long for the suite's 15 minutes. Run it with
# DIFFUSIOND_COMPILE_TEST=1; a second run reuses the cache under --home and is faster.
@pytest.mark.skipif(
    os.environ.get("DIFFUSIOND_COMPILE_TEST") != "1",
    reason="slow: set DIFFUSIOND_COMPILE_TEST=1 to compile the built-in model",
)
@pytest.mark.timeout(1200)
def test_a_compiled_server_serves_an_image_and_caches_under_its_home(model_home: Path) -> None:
    server = start_server(model_home, "--compile", "--dtype", "bfloat16", "--torch-threads", "2")
    try:
        with server.client() as client:
            body = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3}
            job = client.post("/v1/images/generations", json=body).json()
            final = poll_until(client, job["id"], timeout_s=1100, interval_s=0.5)[-1]
            assert final["status"] == "complete", final
            assert final["result"]["images"][0]["image"]
    finally:
        assert server.stop() == 0, server.text()
    cached = list(inductor_cache_dir(model_home).rglob("*"))
    assert any(path.is_file() for path in cached)


# In a child process (the setting is process-wide): the bytes glibc holds in mmap'ed
# chunks (mallinfo2's hblkhd) grow by a fresh 64 MB tensor unless large blocks come
# from the heap; "load" loads the built-in model on the CPU first.
MAPPED_BYTES_OF_A_LARGE_TENSOR = """
import ctypes, ctypes.util, sys
from pathlib import Path
import torch
from diffusiond.backends.diffusers_backend import DiffusersBackend

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd "
                "usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "load":
    DiffusersBackend(model_path=None, home=Path(sys.argv[2]), device="cpu",
                     torch_threads=1, dtype="bfloat16").load()
before = mallinfo2().hblkhd
tensor = torch.empty(64 << 20, dtype=torch.uint8)
print(mallinfo2().hblkhd - before)
"""


def _mapped_bytes(home: Path, mode: str) -> int:
    command = [sys.executable, "-c", MAPPED_BYTES_OF_A_LARGE_TENSOR, mode, str(home)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's malloc",
)
def test_a_loaded_cpu_backend_reuses_large_blocks_instead_of_mapping_them(
    model_home: Path,
) -> None:
    assert _mapped_bytes(model_home, "bare") >= 64 << 20  # glibc's default: mapped afresh
    assert _mapped_bytes(model_home, "load") == 0
