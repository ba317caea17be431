"""A component file's tensors, read one by one into the compute dtype.

Its own module so that the text encoders' loader (component_encoders.py) and the
pipeline's assembly (component_pipeline.py, which imports that loader) share it without
importing each other. A GGUF's quantized tensors are dequantized (gguf_file.py), a
.safetensors is read without a memory map (single_file.py); a file either cannot read is a
ModelLoadError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusiond.errors import ModelLoadError


def read_component(
    path: Path, dtype: torch.dtype, prefix: str = "", *, keep_quantized: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors or .gguf file (those under `prefix`, with it
    stripped, when one is given), floating-point ones in `dtype`; with `keep_quantized`, a
    GGUF's quantized tensors as their raw blocks (diffusers' GGUFParameter)."""
    from diffusiond.backends.gguf_file import GgufFile, GgufFormatError
    from diffusiond.backends.single_file import SafetensorsFile

    try:
        source: Any = GgufFile(path) if path.suffix.lower() == ".gguf" else SafetensorsFile(path)
        index = source.tensors if isinstance(source, GgufFile) else source.entries
        names = [name for name in index if name.startswith(prefix)]
        if isinstance(source, GgufFile):
            tensors: dict[str, torch.Tensor] = source.read(
                names, dtype, keep_quantized=keep_quantized
            )
        else:
            tensors = source.read(names, dtype)
    except (GgufFormatError, OSError, ValueError) as exc:
        raise ModelLoadError(f"component file {path} cannot be read: {exc}") from exc
    return {name[len(prefix) :]: tensor for name, tensor in tensors.items()}
