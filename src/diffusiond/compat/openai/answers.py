"""OpenAI's answers from a job: the images response, the stream's events (pure logic).

The shapes follow the OpenAI SDK's types: `ImagesResponse` ({"created", "data": [{"b64_json"
| "url"}], ...}), `ImageGenPartialImageEvent` / `ImageGenCompletedEvent` (and the
`image_edit.*` twins) for `stream: true`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping

import orjson

from diffusiond.compat.openai.params import AnswerOptions, size_text
from diffusiond.images_in import read_image
from diffusiond.jobs.models import GeneratedImage, Preview, Result

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The qualities the SDK's event and response types name; DALL-E 3's names are reported as
# the step counts they share.
_REPORTED_QUALITY = {"standard": "medium", "hd": "high"}
# No tokens are counted here; the completed event's type requires the object.
ZERO_USAGE: dict[str, object] = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def convert(data: bytes, source: str, answer: AnswerOptions, pixels: int) -> bytes:
    """`data` (an image in `source` format, of `pixels` pixels, made by this server) in the
    answer's output format; JPEG and WebP at `output_compression` as their quality."""
    target = answer.output_format
    if target == source:
        return data
    picture = read_image(data, max_pixels=pixels, mode="RGB")
    buffer = io.BytesIO()
    options: dict[str, object] = {} if target == "png" else {"quality": answer.compression}
    picture.save(buffer, format=_PIL_FORMATS[target], **options)
    return buffer.getvalue()


def image_b64(image: GeneratedImage, answer: AnswerOptions) -> str:
    data = convert(image.png, "png", answer, image.width * image.height)
    return base64.b64encode(data).decode("ascii")


def preview_b64(preview: Preview, answer: AnswerOptions) -> str:
    data = convert(preview.jpeg, "jpeg", answer, preview.width * preview.height)
    return base64.b64encode(data).decode("ascii")


def reported_quality(answer: AnswerOptions) -> str:
    return _REPORTED_QUALITY.get(answer.quality, answer.quality)


def images_body(
    result: Result, answer: AnswerOptions, created: int, url_of: Callable[[int], str]
) -> dict[str, object]:
    """The body of a finished generation or edit; `url_of(index)`: the raw image's URL."""
    data: list[dict[str, str]] = []
    for index, image in enumerate(result.images):
        if answer.response_format == "url":
            data.append({"url": url_of(index)})
        else:
            data.append({"b64_json": image_b64(image, answer)})
    first = result.images[0]
    body: dict[str, object] = {
        "created": created,
        "data": data,
        "background": "opaque",
        "output_format": answer.output_format if answer.response_format == "b64_json" else "png",
        "size": size_text(first.width, first.height),
    }
    quality = reported_quality(answer)
    if quality != "auto":
        body["quality"] = quality
    return body


def _event(
    kind: str, b64: str, *, answer: AnswerOptions, size: str, created: int
) -> dict[str, object]:
    return {
        "type": kind,
        "b64_json": b64,
        "background": answer.background,
        "created_at": created,
        "output_format": answer.output_format,
        "quality": reported_quality(answer),
        "size": size,
    }


def partial_event(
    prefix: str, preview: Preview, *, index: int, answer: AnswerOptions, size: str, created: int
) -> dict[str, object]:
    b64 = preview_b64(preview, answer)
    body = _event(f"{prefix}.partial_image", b64, answer=answer, size=size, created=created)
    body["partial_image_index"] = index
    return body


def completed_event(
    prefix: str, image: GeneratedImage, answer: AnswerOptions, created: int
) -> dict[str, object]:
    size = size_text(image.width, image.height)
    b64 = image_b64(image, answer)
    body = _event(f"{prefix}.completed", b64, answer=answer, size=size, created=created)
    body["usage"] = ZERO_USAGE
    return body


def sse(name: str, payload: Mapping[str, object]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(payload))
