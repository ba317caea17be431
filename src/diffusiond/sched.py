"""Linux scheduling hints for the HTTP thread: a low weight, and a short time slice.

A nice value makes the thread cheap for the generation (it gets little CPU while torch is
busy), but on its own it also makes the thread wait long to run when a poll arrives. Since
Linux 6.12 the EEVDF scheduler lets a thread ask for a shorter slice (`sched_runtime` of a
SCHED_OTHER thread, through sched_setattr): such a thread gets an earlier deadline when it
wakes, so it runs sooner, for short bursts, without getting a larger share of the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_SYSCALL_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
_SCHED_NORMAL = 0


class _SchedAttr(ctypes.Structure):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    )


def set_time_slice(thread_id: int, slice_us: int) -> None:
    """Ask for a `slice_us` time slice for a SCHED_OTHER thread, keeping its nice value.

    Raises OSError where the kernel or the machine cannot (not Linux, an unknown machine
    type, a kernel before 6.12 ignores the slice).
    """
    number = _SYSCALL_SCHED_SETATTR.get(platform.machine())
    if number is None or not hasattr(os, "getpriority"):
        raise OSError(f"sched_setattr is not known on {platform.system()} {platform.machine()}")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        sched_policy=_SCHED_NORMAL,
        sched_nice=os.getpriority(os.PRIO_PROCESS, thread_id),
        sched_runtime=slice_us * 1000,
    )
    if libc.syscall(number, thread_id, ctypes.byref(attr), 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
