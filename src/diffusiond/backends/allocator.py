"""One malloc arena for the whole process, so a served job allocates like a script.

A served job runs on a worker thread, and torch's OpenMP threads are started from it. By
default glibc gives each such thread its own malloc arena: a set of mmap'ed heaps that are
unmapped as soon as they empty, so the VAE's and UNet's large activations are faulted in
from zeroed pages again and again. The main thread's arena keeps freed memory for the next
allocation instead. Measured on the SD 1.5-shaped model's 512x512 bfloat16 decode: 584-680
thousand page faults on a worker thread against 408-414 thousand on the main thread; with
one arena, 405 thousand on either (bench/served_vs_inprocess.py shows the job's time).

It must run before the threads that generate first allocate, which is why the backend does
it when it is built, before the engine starts its workers.

`reuse_large_blocks` goes one step further once a model is loaded: glibc serves every block
over its mmap threshold (32 MB at most) with a fresh mapping and unmaps it when freed, so
each large activation of a decode was faulted in from zeroed pages again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Free memory at the heap's top kept, not returned at once: a decode's largest activations
# (the engine trims the heap after each job: memory.trim_heap).
HEAP_TOP_KEPT = 1 << 30


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt for each (option, value); False where this is not glibc or one fails."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(bool(mallopt(option, value)) for option, value in settings)


@functools.cache
def share_one_malloc_arena() -> bool:
    """Make every thread allocate from the main arena (glibc); False where unsupported."""
    shared = _mallopt((M_ARENA_MAX, 1))
    log.debug("one malloc arena for all threads: %s", shared)
    return shared


def reuse_large_blocks() -> bool:
    """Serve large allocations from the heap, reusing freed ones; False where not glibc.

    Measured on the SD 1.5-shaped 512x512 bfloat16 decode, channels-last, in one process
    alternating both ways: 4.3 s -> 2.1 s on 2 threads, 4.4 s -> 3.0 s on one; page faults
    890 thousand -> under 10 thousand. A UNet step barely changes (its tensors are small).
    Process-wide: call once the model is loaded (its reads are freed and trimmed as before).
    No mmap'ed chunks at all: glibc still falls back to mmap when the heap cannot grow.
    """
    reused = _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, HEAP_TOP_KEPT))
    log.debug("large blocks reused from the heap: %s", reused)
    return reused
