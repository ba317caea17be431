"""Giving freed memory back to the operating system between jobs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


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
