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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h


@functools.cache
def share_one_malloc_arena() -> bool:
    """Make every thread allocate from the main arena (glibc); False where unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    shared = bool(mallopt(M_ARENA_MAX, 1))
    log.debug("one malloc arena for all threads: %s", shared)
    return shared
