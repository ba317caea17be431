"""The one guarded reader for images that come from outside the process.

A file or upload may be a bomb (a small file whose header declares billions of pixels), a
truncated or garbage file, or a format we never meant to parse. Every such image goes
through `read_image` (or `open_checked` when only its metadata is wanted): the format is
one of PNG, JPEG and WebP, the size comes from the header and is refused past
`max_pixels` before any pixel is decoded, and every failure is an `ImageRejected` with a
message fit for a user. Pillow's DecompressionBombWarning/Error never escape.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from PIL import Image as PILImage
from PIL import ImageOps
from PIL.Image import DecompressionBombError, Image
from PIL.ImageFile import ImageFile

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_ALLOWED_TEXT = "PNG, JPEG or WebP"
# Signatures of formats people commonly send, so a refusal can say what the file was.
_KNOWN_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
)


class ImageRejected(ValueError):
    """An image that cannot be accepted; the message says why (format, size, damage)."""


@contextmanager
def open_checked(data: bytes, *, max_pixels: int) -> Iterator[Image]:
    """The image in `data`, opened but not decoded, once its header passed the checks.

    Loading it inside the block is safe: its size is within `max_pixels`. Errors raised
    while decoding inside the block (truncated or corrupt data) become `ImageRejected`.
    """
    if not data:
        raise ImageRejected("the file is empty")
    # Pillow's own bomb check (a warning, then an error, past ~89 Mpx) lives in
    # Image.open, which is not used: the header is parsed by the format's plugin and the
    # size checked here, so the check is ours, and no process-wide warning filter is
    # touched (that would race other threads).
    picture = _open_header(data)
    with picture:
        _check_size(picture, max_pixels)
        try:
            yield picture
        except ImageRejected:
            raise
        except DecompressionBombError as exc:
            raise ImageRejected(f"the image is too large to read: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"the image data is truncated or corrupt: {exc}") from None


def read_image(data: bytes, *, max_pixels: int, mode: Literal["RGB", "RGBA"] = "RGB") -> Image:
    """The decoded image in `data`, turned upright by its EXIF orientation, in `mode`.

    Asked for RGB, transparent parts are laid on white (not the black that dropping the
    alpha channel would leave). Raises `ImageRejected` naming what is wrong.
    """
    with open_checked(data, max_pixels=max_pixels) as picture:
        picture.load()
        upright = ImageOps.exif_transpose(picture)
        # The turn cannot make more pixels, but a rotated size is checked all the same.
        _check_size(upright, max_pixels)
        return _in_mode(upright, mode)


def _open_header(data: bytes) -> ImageFile:
    """The image's header, parsed by the plugin of an allowed format, nothing decoded.

    Like `Image.open(formats=...)`, but without its own bomb check, so that a huge size is
    refused by `_check_size` with the dimensions named, whatever Pillow's limit is.
    """
    PILImage.preinit()
    for name in ALLOWED_FORMATS:
        if name not in PILImage.OPEN:
            PILImage.init()
        factory, accept = PILImage.OPEN[name]
        accepted = accept(data[:16]) if accept is not None else True
        if not accepted or isinstance(accepted, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            raise ImageRejected(f"the {name} header is truncated or corrupt: {exc}") from None
    raise ImageRejected(_unidentified(data))


def _check_size(picture: Image, max_pixels: int) -> None:
    width, height = picture.size
    if width < 1 or height < 1:
        raise ImageRejected(f"the image declares an empty size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"the image is {width}x{height} ({width * height} pixels), over the limit of "
            f"{max_pixels} pixels"
        )


def _in_mode(picture: Image, mode: Literal["RGB", "RGBA"]) -> Image:
    has_alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
    if mode == "RGBA" or not has_alpha:
        return picture.convert(mode)
    rgba = picture.convert("RGBA")
    white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PILImage.alpha_composite(white, rgba).convert("RGB")


def _unidentified(data: bytes) -> str:
    for signature, name in _KNOWN_SIGNATURES:
        if data.startswith(signature):
            return f"{name} is not accepted: send a {_ALLOWED_TEXT} image"
    return f"not a readable image: not a {_ALLOWED_TEXT} image (or too damaged to read)"
