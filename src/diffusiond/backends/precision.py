"""Which floating-point type the model runs in: `--dtype auto|float32|bfloat16|float16`.

`auto` picks bfloat16 on a CPU that computes it natively, float16 on CUDA, float32
otherwise. "Natively" means the CPU has bf16 arithmetic instructions: on x86, the
`avx512_bf16` or `amx_bf16` flags in /proc/cpuinfo (Cooper Lake, Sapphire Rapids, Zen 4
and later); on ARM, the `bf16` feature. Without them PyTorch still runs bf16, but by
converting to float32 around every operation, which is slower than float32 itself.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_BF16_FLAGS = frozenset({"bf16"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in {"flags", "Features"}:
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_native_bf16(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU has bf16 arithmetic instructions (see the module's docstring)."""
    try:
        flags = cpu_flags(cpuinfo_path.read_text(errors="replace"))
    except OSError:
        return False
    return bool(flags & (_X86_BF16_FLAGS | _ARM_BF16_FLAGS))


def resolve_dtype(requested: str, device: str, *, native_bf16: bool | None = None) -> torch.dtype:
    """The dtype for `requested` ("auto" or a name in DTYPES) on `device`."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if dtype is torch.float16 and not device.startswith("cuda"):
            log.warning(
                "--dtype float16 on the CPU: supported, but most CPUs compute it slowly and "
                "some models overflow in it; bfloat16 is the CPU's half precision"
            )
        return dtype
    if device.startswith("cuda"):
        return torch.float16
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    return torch.bfloat16 if native_bf16 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
