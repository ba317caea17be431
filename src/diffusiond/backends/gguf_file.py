"""Whole-checkpoint GGUF files (as stable-diffusion.cpp's `convert` writes them), read offline.

Such a file holds a Stable Diffusion checkpoint's tensors under their original CompVis/ldm
names (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` or
`conditioner.embedders.*`), each in its own type: the linear weights quantized (Q8_0, Q4_K,
...), the rest (convolutions, biases, norms, embeddings) in F16/F32/BF16. Its key-value
metadata carries nothing the loader needs.

The header is parsed here with every length checked against the file's size, so a truncated
or foreign file is refused, naming it, before any large allocation. Each tensor is then read
with a plain read (no memory map: mapped pages count in the RSS), dequantized with the `gguf`
package to float32 and cast to the compute dtype on its own: the largest transient is one
tensor's float32 values, never a float32 copy of the whole model.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from diffusiond.errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS

# Types stored as plain numbers: read as they are, floating ones cast to the compute dtype.
_PLAIN_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8,
    GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32,
    GGMLQuantizationType.I64: torch.int64,
}
# Block-quantized types that `gguf.quants.dequantize` turns back into floats: the ones
# stable-diffusion.cpp's --type offers, and the IQ4 ones some community files use.
QUANTIZED_TYPES = frozenset(
    {
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q2_K,
        GGMLQuantizationType.Q3_K,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
        GGMLQuantizationType.IQ4_NL,
        GGMLQuantizationType.IQ4_XS,
    }
)
SUPPORTED_TYPES = frozenset(_PLAIN_TYPES) | QUANTIZED_TYPES

# Fixed-size metadata values: struct format per type (little-endian).
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GgufFormatError(ValueError):
    """What is wrong with a file's bytes; the caller names the file."""


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # torch's order (outermost first): ggml's dims reversed
    kind: GGMLQuantizationType
    start: int  # absolute offset of its bytes in the file
    size: int  # bytes


class _HeaderReader:
    """Reads the header's little-endian fields, refusing any that would run past the end."""

    def __init__(self, file: BinaryIO, file_size: int) -> None:
        self._file = file
        self._file_size = file_size

    @property
    def position(self) -> int:
        return self._file.tell()

    def take(self, count: int) -> bytes:
        if count < 0 or self.position + count > self._file_size:
            raise GgufFormatError(
                f"the header runs past the end of the file at byte {self.position} (truncated?)"
            )
        return self._file.read(count)

    def scalar(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")

    def skip(self, count: int) -> None:
        if self.position + count > self._file_size:
            raise GgufFormatError("a metadata value runs past the end of the file (truncated?)")
        self._file.seek(count, 1)

    def value(self, kind: int) -> object:
        """One metadata value; arrays are skipped (None): nothing here needs them."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind, count = self.u32(), self.u64()
            if item_kind in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[GGUFValueType(item_kind)]))
            elif item_kind == GGUFValueType.STRING:
                for _ in range(count):
                    self.skip(self.u64())
            else:
                raise GgufFormatError(f"an array of the unknown value type {item_kind}")
            return None
        if kind not in _SCALARS:
            raise GgufFormatError(f"a metadata value of the unknown type {kind}")
        return self.scalar(_SCALARS[GGUFValueType(kind)])


class GgufFile:
    """A GGUF file's tensor index and the metadata that matters, read and checked at open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, GgufTensor] = {}
        self.architecture: str | None = None  # general.architecture, where an LLM file has it
        file_size = path.stat().st_size
        with path.open("rb") as file:
            header = _HeaderReader(file, file_size)
            magic = file.read(4)
            if magic != GGUF_MAGIC:
                raise GgufFormatError(f"it does not start with the GGUF magic (found {magic!r})")
            version = header.u32()
            if version not in (2, 3):
                raise GgufFormatError(f"GGUF version {version} is not supported (only 2 and 3)")
            tensor_count, metadata_count = header.u64(), header.u64()
            # each entry takes at least 8 bytes: more than fit in the file means garbage
            if (tensor_count + metadata_count) * 8 > file_size:
                raise GgufFormatError(
                    f"it claims {tensor_count} tensors and {metadata_count} metadata entries, "
                    "more than the file can hold (truncated or corrupt?)"
                )
            alignment = self._read_metadata(header, metadata_count)
            infos = [self._read_tensor_info(header) for _ in range(tensor_count)]
            data_start = _align(header.position, alignment)
        for name, shape, kind, offset in infos:
            tensor = _tensor(name, shape, kind, data_start + offset)
            if tensor.start + tensor.size > file_size:
                raise GgufFormatError(
                    f"tensor {name} runs past the end of the file (it needs bytes up to "
                    f"{tensor.start + tensor.size}, the file has {file_size}; truncated?)"
                )
            self.tensors[name] = tensor

    def _read_metadata(self, header: _HeaderReader, count: int) -> int:
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(count):
            key = header.string()
            value = header.value(header.u32())
            if key == "general.alignment" and isinstance(value, int):
                if value <= 0 or value & (value - 1):
                    raise GgufFormatError(f"general.alignment {value} is not a power of two")
                alignment = value
            elif key == "general.architecture" and isinstance(value, str):
                self.architecture = value
        return alignment

    @staticmethod
    def _read_tensor_info(header: _HeaderReader) -> tuple[str, tuple[int, ...], int, int]:
        name = header.string()
        dims_count = header.u32()
        if dims_count > _MAX_DIMS:
            raise GgufFormatError(f"tensor {name} has {dims_count} dimensions (ggml allows 4)")
        dims = [header.u64() for _ in range(dims_count)]
        kind, offset = header.u32(), header.u64()
        return name, tuple(reversed(dims)), kind, offset

    def read(
        self, names: list[str], dtype: torch.dtype, *, keep_quantized: bool = False
    ) -> dict[str, torch.Tensor]:
        """The named tensors, floating-point ones (and every quantized one) in `dtype`; with
        `keep_quantized`, the quantized ones as their raw blocks (`quantized_blocks`)."""
        out: dict[str, torch.Tensor] = {}
        with self.path.open("rb", buffering=0) as file:
            for name in names:
                tensor = self.tensors[name]
                buffer = bytearray(tensor.size)
                file.seek(tensor.start)
                if file.readinto(buffer) != tensor.size:
                    raise GgufFormatError(f"tensor {name} is cut short (truncated file?)")
                if keep_quantized and tensor.kind in QUANTIZED_TYPES:
                    out[name] = quantized_blocks(buffer, tensor)
                else:
                    out[name] = _decode(buffer, tensor, dtype)
        return out


def _align(position: int, alignment: int) -> int:
    return (position + alignment - 1) // alignment * alignment


def _tensor(name: str, shape: tuple[int, ...], kind_number: int, start: int) -> GgufTensor:
    try:
        kind = GGMLQuantizationType(kind_number)
    except ValueError:
        raise GgufFormatError(f"tensor {name} has the unknown type number {kind_number}") from None
    if kind not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise GgufFormatError(
            f"tensor {name} is stored as {kind.name}, which cannot be read (supported: {supported})"
        )
    block, block_bytes = GGML_QUANT_SIZES[kind]
    row = shape[-1] if shape else 1
    if row % block:
        raise GgufFormatError(
            f"tensor {name}: rows of {row} values are not whole {kind.name} blocks of {block}"
        )
    return GgufTensor(name, shape, kind, start, math.prod(shape) // block * block_bytes)


def _decode(buffer: bytearray, tensor: GgufTensor, dtype: torch.dtype) -> torch.Tensor:
    plain = _PLAIN_TYPES.get(tensor.kind)
    if plain is not None:
        if not buffer:
            return torch.empty(tensor.shape, dtype=plain)
        values = torch.frombuffer(buffer, dtype=plain).reshape(tensor.shape)
        return values.to(dtype) if values.is_floating_point() else values
    from gguf.quants import dequantize

    # dequantize takes rows of blocks (..., bytes per row) and gives (..., values per row)
    rows = np.frombuffer(buffer, dtype=np.uint8).reshape(*tensor.shape[:-1], -1)
    floats = torch.from_numpy(dequantize(rows, tensor.kind))
    return floats.reshape(tensor.shape).to(dtype)


def quantized_blocks(buffer: bytearray, tensor: GgufTensor) -> torch.Tensor:
    """A quantized tensor's bytes as diffusers' GGUFParameter: one row of blocks per row
    of values (shape (..., bytes per row)), its type with it, dequantized where used."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    rows = torch.frombuffer(buffer, dtype=torch.uint8).reshape(*tensor.shape[:-1], -1)
    blocks: torch.Tensor = GGUFParameter(rows, quant_type=tensor.kind)
    return blocks


def open_gguf(path: Path, unet_prefix: str) -> GgufFile:
    """A checked GGUF checkpoint, or a ModelLoadError naming the file and what is wrong."""
    try:
        gguf = GgufFile(path)
    except (GgufFormatError, OSError) as exc:
        raise ModelLoadError(f"model file {path} is not a readable GGUF file: {exc}") from exc
    if not any(name.startswith(unet_prefix) for name in gguf.tensors):
        what = f"a GGUF of a {gguf.architecture!r} model" if gguf.architecture else "a GGUF"
        raise ModelLoadError(
            f"model file {path} is {what} without Stable Diffusion tensors (no "
            f"{unet_prefix}*): only whole SD 1.x/2.x/SDXL checkpoints in the original "
            "CompVis/ldm names, as stable-diffusion.cpp's convert writes them, are supported"
        )
    return gguf
