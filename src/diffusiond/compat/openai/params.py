"""The OpenAI request fields, checked and turned into a diffusiond request (pure logic).

A field may come from a JSON body (typed values) or from a multipart form (every value a
string, as the SDK sends `images.edit`): `Fields` reads both the same way, and every refusal
names the OpenAI parameter and its rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from diffusiond.api.params import read_uint, shown
from diffusiond.errors import InvalidRequest

MAX_PROMPT_CHARS = 10_000
# quality -> diffusion steps. `auto` is the native default; `standard` and `hd` are the
# DALL-E 3 names for the middle and the top.
QUALITY_STEPS: dict[str, int] = {
    "low": 10,
    "medium": 20,
    "high": 30,
    "auto": 20,
    "standard": 20,
    "hd": 30,
}
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_PARTIAL_IMAGES = 3
DEFAULT_COMPRESSION = 100
AUTO_SIDE = 512  # `size: auto` for text-to-image: the native default, within the budget
MIN_SIDE, MAX_SIDE = 64, 2048
# Accepted, checked, and without effect here (documented in docs/API.md).
IGNORED_CHOICES: dict[str, tuple[str, ...]] = {
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
    "style": ("vivid", "natural"),
    "input_fidelity": ("high", "low"),
}
IGNORED_TEXT = ("user", "safety_identifier")
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def refuse(param: str, rule: str, got: str) -> InvalidRequest:
    return InvalidRequest(f"{param} must be {rule}, got {got}", field=param, rule=rule)


def _shown(value: object) -> str:
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return "an array" if isinstance(value, list) else "an object"


class Fields:
    """The request's fields by OpenAI name; `form`: every value arrived as a string."""

    def __init__(self, values: Mapping[str, object], *, form: bool = False) -> None:
        self._values = values
        self._form = form

    def given(self, name: str) -> bool:
        return self._values.get(name) is not None

    def text(self, name: str, *, required: bool = False, limit: int = MAX_PROMPT_CHARS) -> str:
        rule = f"a{' non-empty' if required else ''} string of at most {limit} characters"
        value = self._values.get(name)
        if value is None and required:
            raise InvalidRequest(f"{name} is required", field=name, rule=rule)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise refuse(name, rule, _shown(value))
        if required and not value.strip():
            raise refuse(name, rule, "an empty string")
        if len(value) > limit:
            raise refuse(name, rule, f"{len(value)} characters")
        return value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        rule = f"an integer from {low} to {high}"
        value = self._values.get(name)
        if value is None:
            return default
        if self._form and isinstance(value, str):
            number = read_uint(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            number = None
        if number is None or not low <= number <= high:
            raise refuse(name, rule, _shown(value))
        return number

    def boolean(self, name: str) -> bool:
        rule = "true or false"
        value = self._values.get(name)
        if value is None:
            return False
        if self._form and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise refuse(name, rule, _shown(value))
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self._values.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise refuse(name, f"one of {', '.join(choices)}", _shown(value))
        return value

    def check_ignored(self) -> None:
        """The fields that have no meaning here still have to be well-formed."""
        for name, choices in IGNORED_CHOICES.items():
            self.choice(name, choices, choices[-1])
        for name in IGNORED_TEXT:
            self.text(name, limit=256)


@dataclass(frozen=True)
class AnswerOptions:
    """How the answer is given: its format, the stream, what the events report."""

    response_format: str = "b64_json"
    output_format: str = "png"
    compression: int = DEFAULT_COMPRESSION  # the JPEG/WebP quality, 0..100
    stream: bool = False
    partial_images: int = 0  # only when streaming
    quality: str = "auto"
    background: str = "auto"


@dataclass(frozen=True)
class Common:
    """The fields a generation and an edit share."""

    prompt: str
    count: int
    steps: int
    size: tuple[int, int] | None  # None: `auto`
    answer: AnswerOptions


def read_common(fields: Fields, *, max_batch: int, max_pixels: int) -> Common:
    prompt = fields.text("prompt", required=True)
    quality = fields.choice("quality", tuple(QUALITY_STEPS), "auto")
    stream = fields.boolean("stream")
    partial_images = fields.integer("partial_images", 0, MAX_PARTIAL_IMAGES, 0)
    answer = AnswerOptions(
        response_format=fields.choice("response_format", RESPONSE_FORMATS, "b64_json"),
        output_format=fields.choice("output_format", OUTPUT_FORMATS, "png"),
        compression=fields.integer("output_compression", 0, 100, DEFAULT_COMPRESSION),
        stream=stream,
        partial_images=partial_images if stream else 0,
        quality=quality,
        background=fields.choice("background", IGNORED_CHOICES["background"], "auto"),
    )
    fields.check_ignored()
    return Common(
        prompt=prompt,
        count=fields.integer("n", 1, max_batch, 1),
        steps=QUALITY_STEPS[quality],
        size=parse_size(fields, max_pixels),
        answer=answer,
    )


def parse_size(fields: Fields, max_pixels: int) -> tuple[int, int] | None:
    """`WxH` (each side 64..2048, a multiple of 8, within the pixel budget), or None for
    `auto` (also when left out)."""
    raw = fields.text("size", limit=16) or "auto"
    if raw == "auto":
        return None
    rule = (
        f"auto or WIDTHxHEIGHT, each side from {MIN_SIDE} to {MAX_SIDE} and a multiple of 8, "
        f"at most {max_pixels} pixels in all"
    )
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise refuse("size", rule, shown(raw))
    width, height = int(match.group(1)), int(match.group(2))
    sides_ok = all(MIN_SIDE <= side <= MAX_SIDE and side % 8 == 0 for side in (width, height))
    if not sides_ok or width * height > max_pixels:
        raise refuse("size", rule, shown(raw))
    return width, height


def auto_size(max_pixels: int) -> tuple[int, int]:
    """`size: auto` for text-to-image: 512x512, or the largest square the budget holds."""
    side = min(AUTO_SIDE, math.isqrt(max_pixels) // 8 * 8)
    return max(MIN_SIDE, side), max(MIN_SIDE, side)


def preview_every(diffusion_steps: int, partial_images: int) -> int:
    """Steps between live previews so that `partial_images` of them come before the end;
    0 (no previews) when none are asked for."""
    if partial_images <= 0:
        return 0
    return max(1, diffusion_steps // (partial_images + 1))


def size_text(width: int, height: int) -> str:
    return f"{width}x{height}"
