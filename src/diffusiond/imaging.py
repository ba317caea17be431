"""Image encoding, done once per image when it is finished, with the recipe inside.

Every PNG carries two text chunks: `diffusiond`, a JSON object of the exact parameters
(what `--from-png` and `diffusiond.client.png_parameters` read back), and `parameters`, the
plain-text line most Stable Diffusion tools show and read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from PIL.Image import Image
from PIL.PngImagePlugin import PngInfo

from diffusiond.images_in import ImageRejected, open_checked

# Level 1 is ~6x faster than Pillow's default 6 on 512x512 images and within a few
# percent of its size on the noisy pictures diffusion models draw.
_PNG_COMPRESS_LEVEL = 1
PNG_TEXT_KEY = "diffusiond"
# The largest PNG whose recipe is read back: 16 Mpx (4096x4096), four times the largest
# image a default server draws, so any of its own files passes and no bomb does.
RECIPE_MAX_PIXELS = 16 * 1024 * 1024
# The fields of the JSON chunk that make a request (the rest describe where it came from).
REQUEST_FIELDS = (
    "prompt",
    "negativePrompt",
    "width",
    "height",
    "steps",
    "cfgScale",
    "seed",
    "sampler",
)


def encode_png(image: Image, text: Mapping[str, str] | None = None) -> bytes:
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # international text: any prompt, UTF-8
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, pnginfo=info)
    return buffer.getvalue()


def encode_preview(image: Image) -> bytes:
    """A live preview: small, so JPEG at a modest quality (a few kB)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def recipe_text(recipe: Mapping[str, Any]) -> dict[str, str]:
    """The text chunks for one image from its recipe (wire names: prompt, seed, ...)."""
    negative = recipe["negativePrompt"]
    line = (
        f"Steps: {recipe['steps']}, Sampler: {recipe['sampler']}, CFG scale: {recipe['cfgScale']}, "
        f"Seed: {recipe['seed']}, Size: {recipe['width']}x{recipe['height']}, "
        + (f"Model hash: {recipe['modelHash']}, " if "modelHash" in recipe else "")
        + f"Model: {recipe['model']}, Version: diffusiond {recipe['version']}"
    )
    # the names AUTOMATIC1111 writes for the same settings
    if recipe.get("scheduler", "discrete") != "discrete":
        line += f", Schedule type: {recipe['scheduler']}"
    if "clipSkip" in recipe:
        line += f", Clip skip: {recipe['clipSkip']}"
    if recipe.get("loras"):
        shown = ", ".join(f"{lora['name']}: {lora['weight']}" for lora in recipe["loras"])
        line += f', Lora weights: "{shown}"'
    if "strength" in recipe:
        line += f", Denoising strength: {recipe['strength']}"
    if "maskBlur" in recipe:
        line += f", Mask blur: {recipe['maskBlur']}"
    lines = [recipe["prompt"], *([f"Negative prompt: {negative}"] if negative else []), line]
    return {
        PNG_TEXT_KEY: json.dumps(dict(recipe), ensure_ascii=False, separators=(",", ":")),
        "parameters": "\n".join(lines),
    }


def read_recipe(png: bytes, *, max_pixels: int = RECIPE_MAX_PIXELS) -> dict[str, Any]:
    """The `diffusiond` JSON chunk of a PNG; ValueError naming what is wrong otherwise.

    The file goes through the guarded reader: its text chunks may follow the pixels, so
    reading them decodes the image, which is only done within `max_pixels`.
    """
    with open_checked(png, max_pixels=max_pixels) as picture:
        if picture.format != "PNG":
            raise ImageRejected(f"not a PNG file (it is {picture.format})")
        text = dict(getattr(picture, "text", {}))
    raw = text.get(PNG_TEXT_KEY)
    if raw is None:
        raise ValueError(f"the PNG has no {PNG_TEXT_KEY!r} text chunk (not made by diffusiond)")
    try:
        recipe = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the {PNG_TEXT_KEY!r} text chunk is not JSON: {exc}") from None
    if not isinstance(recipe, dict) or any(name not in recipe for name in REQUEST_FIELDS):
        raise ValueError(f"the {PNG_TEXT_KEY!r} text chunk lacks the request fields")
    return recipe
