"""What every diffusers-based backend does the same way: the device it runs on, the
settings torch keeps per thread, and which errors mean the device ran out of memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diffusiond.backends.base import DeviceOutOfMemory
from diffusiond.errors import ModelLoadError


def resolve_device(wanted: str) -> str:
    """The device for `--device` ("auto", "cpu", "cuda", "cuda:N"), checked against torch."""
    has_cuda = bool(torch.cuda.is_available())
    if wanted == "auto":
        return "cuda" if has_cuda else "cpu"
    if wanted.startswith("cuda") and not has_cuda:
        raise ModelLoadError(
            f"device {wanted!r} was asked for, but PyTorch {torch.__version__} sees no "
            "CUDA device; use --device cpu"
        )
    return wanted


def prepare_thread(state: threading.local, torch_threads: int) -> None:
    """Settings torch keeps per thread, made on the thread that generates (once each).

    The server loads on one thread and generates on another: OpenMP's thread count is
    a per-thread setting, and so is flushing denormal numbers to zero (the CPU's
    control register), which keeps a step's tiny values from the slow path.
    """
    if getattr(state, "prepared", False):
        return
    torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)
    state.prepared = True


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


@contextmanager
def out_of_memory_named(device: str) -> Iterator[None]:
    """Re-raise a generation's out-of-memory error, whatever raised it (torch, the
    allocator, a MemoryError), as DeviceOutOfMemory naming the device; anything else as is."""
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc):
            raise DeviceOutOfMemory(f"out of memory on {device}: {exc}") from exc
        raise
