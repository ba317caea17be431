"""The image-editing fields of a generation request: initImage, strength, maskImage, maskBlur.

Every image goes through the guarded reader (`diffusiond.images_in`) before anything is
queued: format, a size read from the header (refused past 4 x the pixel budget before any
pixel is decoded), EXIF orientation and damage are all checked here, so a job never fails
later on an image it was given.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

from diffusiond.errors import InvalidRequest
from diffusiond.images_in import ImageRejected, read_image
from diffusiond.jobs.models import DEFAULT_MASK_BLUR, DEFAULT_STRENGTH, EditInputs, InputImage

# How many times the output's pixel budget an input image may have: it is resized down.
INPUT_PIXELS_FACTOR = 4
MAX_MASK_BLUR = 64
MIN_SIDE, MAX_SIDE = 64, 2048

IMAGE_RULE = (
    "a base64 string (or a data:image/png|jpeg|webp;base64, URL) of a PNG, JPEG or WebP image"
)
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
_DATA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_WHITESPACE = re.compile(rb"\s+")


def _refuse(field: str, rule: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field} must be {rule}: {message}", field=field, rule=rule)


def decode_base64_image(field: str, value: object) -> bytes:
    """The bytes of a base64 string or a data:image/...;base64, URL; a 400 otherwise."""
    if not isinstance(value, str):
        raise _refuse(field, IMAGE_RULE, f"got {type(value).__name__}")
    text = value.strip()
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            raise _refuse(field, IMAGE_RULE, "a data: URL needs a comma before its data")
        media_type = match.group(1).strip().lower()
        parameters = [p.strip().lower() for p in match.group(2).split(";") if p.strip()]
        if media_type not in _DATA_TYPES:
            shown = media_type or "no media type"
            raise _refuse(field, IMAGE_RULE, f"the data: URL is {shown!r}, not an image type")
        if "base64" not in parameters:
            raise _refuse(field, IMAGE_RULE, "the data: URL is not ;base64, encoded")
        text = text[match.end() :]
    raw = text.encode("ascii", "replace")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        try:  # MIME-style base64 wraps its lines; whitespace is allowed, nothing else
            data = base64.b64decode(_WHITESPACE.sub(b"", raw), validate=True)
        except (binascii.Error, ValueError):
            raise _refuse(field, IMAGE_RULE, "it is not valid base64") from None
    if not data:
        raise _refuse(field, IMAGE_RULE, "it is empty")
    return data


def read_input_image(field: str, value: object, max_pixels: int) -> InputImage:
    """A checked input image: decoded once here to prove it whole, kept as received."""
    data = decode_base64_image(field, value)
    limit = max_pixels * INPUT_PIXELS_FACTOR
    try:
        picture = read_image(data, max_pixels=limit, mode="RGBA")
    except ImageRejected as exc:
        raise _refuse(field, IMAGE_RULE + f" of at most {limit} pixels", str(exc)) from None
    return InputImage(data, picture.width, picture.height)


def _strength(value: object) -> float:
    rule = "a number from 0 to 1"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse("strength", rule, f"got {value!r}")
    if not 0 <= value <= 1:
        raise _refuse("strength", rule, f"got {value}")
    return float(value)


def _mask_blur(value: object) -> int:
    rule = f"an integer from 0 to {MAX_MASK_BLUR}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse("maskBlur", rule, f"got {value!r}")
    if not 0 <= value <= MAX_MASK_BLUR:
        raise _refuse("maskBlur", rule, f"got {value}")
    return value


def _needs(field: str, needed: str) -> InvalidRequest:
    rule = f"given only with {needed}"
    return InvalidRequest(f"{field} is {rule}", field=field, rule=rule)


def parse_edit_inputs(data: dict[str, Any], max_pixels: int) -> EditInputs | None:
    """The request's editing inputs (None for text-to-image), every rule checked."""
    given = {
        name
        for name in ("initImage", "strength", "maskImage", "maskBlur")
        if data.get(name) is not None
    }
    if "initImage" not in given:
        for name in ("maskImage", "strength", "maskBlur"):
            if name in given:
                raise _needs(name, "initImage")
        return None
    if "maskBlur" in given and "maskImage" not in given:
        raise _needs("maskBlur", "maskImage")
    strength = _strength(data["strength"]) if "strength" in given else DEFAULT_STRENGTH
    mask_blur = _mask_blur(data["maskBlur"]) if "maskBlur" in given else DEFAULT_MASK_BLUR
    init = read_input_image("initImage", data["initImage"], max_pixels)
    mask = None
    if "maskImage" in given:
        mask = read_input_image("maskImage", data["maskImage"], max_pixels)
        if (mask.width, mask.height) != (init.width, init.height):
            rule = "the same size as initImage"
            raise InvalidRequest(
                f"maskImage must be {rule}: it is {mask.width}x{mask.height}, initImage is "
                f"{init.width}x{init.height}",
                field="maskImage",
                rule=rule,
            )
    return EditInputs(init=init, strength=strength, mask=mask, mask_blur=mask_blur)


def default_size(
    init: InputImage, width: int | None, height: int | None, max_pixels: int
) -> tuple[int, int]:
    """The output size when width or height is left out: the init image's, rounded down
    to a multiple of 8 and, when neither is given, scaled down into the pixel budget."""
    scale = 1.0
    if width is None and height is None:
        scale = min(
            1.0,
            math.sqrt(max_pixels / (init.width * init.height)),
            MAX_SIDE / init.width,
            MAX_SIDE / init.height,
        )
    sizes = {}
    for field, given, side in (("width", width, init.width), ("height", height, init.height)):
        if given is not None:
            sizes[field] = given
            continue
        derived = int(side * scale) // 8 * 8
        if not MIN_SIDE <= derived <= MAX_SIDE:
            rule = f"given when the initImage's {field} is outside {MIN_SIDE} to {MAX_SIDE}"
            raise InvalidRequest(
                f"{field} must be {rule}: initImage is {init.width}x{init.height}",
                field=field,
                rule=rule,
            )
        sizes[field] = derived
    return sizes["width"], sizes["height"]
