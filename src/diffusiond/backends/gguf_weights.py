"""A GGUF diffusion model's quantized linear weights kept quantized (`--gguf-weights`).

Dequantized to bfloat16, a Q8_0 FLUX.1 (12 B parameters) takes 24 GB of RAM; kept as its
blocks, 12.7 GB (Q4_0: 6.7 GB). diffusers' GGUF support keeps such weights as
`GGUFParameter`s (the raw blocks and their type) in `GGUFLinear` layers, which dequantize
the weight at every call: less memory, some time per step. The component loader reads the
blocks (gguf_file.quantized_blocks), diffusers' converters cut and join them by whole rows
(dim 0, as in diffusers' own GGUF single-file path), and here the model's shapes are read
as the values' shapes, the `nn.Linear`s whose weight is quantized become `GGUFLinear`s, and
any other quantized tensor (a token, a convolution) is dequantized to the compute dtype.

Measured on CPU (bench/gguf_keep.py: FLUX.1's widths, bfloat16, 512x512, 2 threads), a kept
model's forward is 2.5-4x slower: dequantizing each weight at each call costs more than its
matmul. So `auto` (the default) dequantizes whenever the model fits, and keeps the weights
quantized only when the dequantized model would take more than half the memory available
at load: the text encoders, the VAE and the activations need the rest, and a model that
does not fit does not draw at all (or swaps, slower still).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

GGUF_WEIGHTS = ("auto", "dequantize", "quantized")
AUTO_SHARE = 0.5  # auto: keep quantized when dequantized > this share of available memory
_MEMINFO = Path("/proc/meminfo")


def keep_quantized(setting: str, dequantized_bytes: int, available_bytes: int | None) -> bool:
    """Whether to keep a GGUF model's quantized weights quantized: `quantized` always,
    `dequantize` never, `auto` when `dequantized_bytes` exceeds AUTO_SHARE of
    `available_bytes` (unknown available memory: keep them, the safe side)."""
    if setting not in GGUF_WEIGHTS:
        raise ValueError(f"gguf_weights must be one of {', '.join(GGUF_WEIGHTS)}, got {setting!r}")
    if setting != "auto":
        return setting == "quantized"
    if available_bytes is None:
        return True
    return dequantized_bytes > AUTO_SHARE * available_bytes


def available_memory(meminfo: Path = _MEMINFO) -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), in
    bytes; None where there is no /proc/meminfo or it has no such line."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            fields = rest.split()
            return int(fields[0]) * 1024 if fields and fields[0].isdigit() else None
    return None


def dequantized_size(path: Path, dtype: torch.dtype) -> int:
    """Bytes the quantized tensors of the GGUF `path` take dequantized to `dtype`; 0 when
    it has none, is no GGUF or cannot be read (the reader then says what is wrong with it,
    naming it)."""
    from diffusiond.backends.gguf_file import (
        GGUF_SUFFIX,
        QUANTIZED_TYPES,
        GgufFile,
        GgufFormatError,
    )

    if path.suffix.lower() != GGUF_SUFFIX:
        return 0
    try:
        index = GgufFile(path).tensors
    except (GgufFormatError, OSError):
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    quantized = [t for t in index.values() if t.kind in QUANTIZED_TYPES]
    return sum(_count(t.shape) * size for t in quantized)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def choose(setting: str, path: Path, dtype: torch.dtype) -> bool:
    """Whether the diffusion model in `path` is read with its quantized weights kept."""
    if setting == "dequantize":
        return False
    needed = dequantized_size(path, dtype)
    return needed > 0 and keep_quantized(setting, needed, available_memory())


def is_quantized(tensor: torch.Tensor) -> bool:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return isinstance(tensor, GGUFParameter)


def value_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of a tensor's values: a GGUFParameter's quant_shape, else its own."""
    if is_quantized(tensor):
        blocks: Any = tensor  # a GGUFParameter: its values' shape beside its bytes'
        return tuple(blocks.quant_shape)
    return tuple(tensor.shape)


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each quantized one stood in for by an empty meta tensor of its
    values' shape, for the config readers (which read only names and shapes)."""
    return {
        name: torch.empty(value_shape(t), device="meta") if is_quantized(t) else t
        for name, t in tensors.items()
    }


def use_quantized_linears(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> int:
    """Make each `nn.Linear` of `module` whose weight in `tensors` is quantized a
    `GGUFLinear` computing in `dtype`, holding that weight (so `load_state_dict(assign=
    True)` takes it as it is); dequantize every other quantized tensor in `tensors` to
    `dtype`. Returns how many layers were replaced."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

    replaced = 0
    for name, tensor in list(tensors.items()):
        if not is_quantized(tensor):
            continue
        owner_name, _, param = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if param != "weight" or type(owner) is not torch.nn.Linear:
            tensors[name] = dequantize_gguf_tensor(tensor).to(dtype)
            continue
        layer = GGUFLinear(
            owner.in_features,
            owner.out_features,
            bias=owner.bias is not None,
            compute_dtype=dtype,
            device="meta",
        )
        layer.weight = tensor
        parent_name, _, child = owner_name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer)
        replaced += 1
    return replaced
