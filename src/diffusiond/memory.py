"""Keeping the server's resident memory flat: bounded kernel caches, trimmed heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Mapping, MutableMapping

# PyTorch runs bfloat16 (and some float32) convolutions and matmuls on the CPU through oneDNN,
# which builds a "primitive" (a JIT-compiled kernel and its plan) for every distinct tensor
# shape. Two caches keep them, 1024 entries each by default: oneDNN's own (which saves
# rebuilding a kernel: an image needs 90-150 of them, reused at every step) and ideep's,
# PyTorch's wrapper (oneDNN's hits make it redundant, and it holds most of the memory). A
# server drawing many image sizes grew ~2 MB per new size until they were full (~200 MB over
# the soak's 625 sizes). ideep's cut to one entry and oneDNN's to 512 (a few images' kernels)
# keep it flat at the same speed: bench/bf16_memory.py.
KERNEL_CACHE_CAPACITIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 512, "LRU_CACHE_CAPACITY": 1}
KERNEL_CACHE_VARIABLES = tuple(KERNEL_CACHE_CAPACITIES)


def bound_kernel_caches(
    environ: MutableMapping[str, str] = os.environ,
    capacities: Mapping[str, int] = KERNEL_CACHE_CAPACITIES,
) -> dict[str, str]:
    """Set the kernel caches' capacities in `environ`, except those it already sets (the
    user's value wins: 1024 for both is PyTorch's own default). Returns what it set. Both
    are read when torch builds its first kernel: call this before that, at start-up.
    """
    chosen = {name: str(entries) for name, entries in capacities.items() if name not in environ}
    environ.update(chosen)
    return chosen


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc's malloc_trim); False where unsupported.

    Images of different sizes leave differently sized free blocks behind; without a trim,
    glibc keeps them, and the server's resident memory creeps up with every new size.
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
