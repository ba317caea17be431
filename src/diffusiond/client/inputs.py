"""Input images for image-to-image and inpainting: a path, bytes or a PIL image, as base64.

A file is sent as its bytes, unchanged (the server's recipe records their SHA-256, so
`--from-png` can check that the same file is given again); a PIL image is encoded as PNG.
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from PIL.Image import Image

# Larger than any body a default server takes (24 MiB): refused before it is read.
MAX_INPUT_FILE_BYTES = 64 * 1024 * 1024

ImageInput = Union[str, Path, bytes, "Image"]


def input_bytes(source: ImageInput) -> bytes:
    """The bytes that stand for `source`: a file's content, bytes as given, a PIL image
    as PNG. Raises OSError when a file cannot be read, ValueError when it is too large."""
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | Path):
        path = Path(source)
        size = path.stat().st_size
        if size > MAX_INPUT_FILE_BYTES:
            raise ValueError(f"{path} is {size} bytes, over the limit of {MAX_INPUT_FILE_BYTES}")
        return path.read_bytes()
    if hasattr(source, "save"):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an input image is a path, bytes or a PIL image, not {type(source).__name__}")


def input_base64(source: ImageInput) -> str:
    return base64.b64encode(input_bytes(source)).decode("ascii")


def sha256_of(source: ImageInput) -> str:
    return hashlib.sha256(input_bytes(source)).hexdigest()
