"""POST /sdapi/v1/png-info: the generation parameters written in an uploaded image.

The upload is untrusted: it goes through diffusiond's guarded reader with the same pixel
limit as reading a recipe back (`imaging.RECIPE_MAX_PIXELS`), so a bomb or a damaged file
is a 400 naming `image`, never a decode of billions of pixels.
"""

from __future__ import annotations

from typing import Any

from diffusiond.api.a1111.shapes import parse_infotext
from diffusiond.api.edit_fields import IMAGE_RULE, decode_base64_image
from diffusiond.errors import InvalidRequest
from diffusiond.images_in import ImageRejected, open_checked
from diffusiond.imaging import RECIPE_MAX_PIXELS


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (empty for a JPEG or WebP); ImageRejected if unreadable."""
    with open_checked(data, max_pixels=RECIPE_MAX_PIXELS) as picture:
        picture.load()  # text chunks after the pixels are only read with them
        if picture.format != "PNG":
            return {}
        return {str(key): str(value) for key, value in dict(getattr(picture, "text", {})).items()}


def png_info_body(data: dict[str, Any]) -> dict[str, Any]:
    """`{"info", "items", "parameters"}` as A1111 answers: the `parameters` text, the other
    text chunks, and the text parsed into its settings."""
    if data.get("image") is None:
        raise InvalidRequest("image is required", field="image", rule=IMAGE_RULE)
    raw = decode_base64_image("image", data["image"])
    try:
        chunks = png_text(raw)
    except ImageRejected as exc:
        rule = f"{IMAGE_RULE} of at most {RECIPE_MAX_PIXELS} pixels"
        raise InvalidRequest(f"image must be {rule}: {exc}", field="image", rule=rule) from None
    info = chunks.pop("parameters", "")
    return {"info": info, "items": chunks, "parameters": parse_infotext(info) if info else {}}
