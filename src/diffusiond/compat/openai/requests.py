"""An OpenAI generation or edit request as an ordinary diffusiond `GenerationRequest`."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from PIL import ImageOps

from diffusiond.api.edit_fields import (
    IMAGE_RULE,
    INPUT_PIXELS_FACTOR,
    default_size,
    parse_edit_inputs,
)
from diffusiond.compat.openai.models import requested_model
from diffusiond.compat.openai.multipart import Form
from diffusiond.compat.openai.params import (
    AnswerOptions,
    Fields,
    auto_size,
    preview_every,
    read_common,
    refuse,
)
from diffusiond.errors import InvalidRequest
from diffusiond.images_in import ImageRejected, open_checked, read_image
from diffusiond.jobs.models import GenerationRequest

# How much of the image an edit redraws: all of the masked area; without a mask, the
# native default (an edit keeps the picture's layout and colours).
MASKED_STRENGTH = 1.0
UNMASKED_STRENGTH = 0.75
IMAGE_FILES = ("image", "image[]")
# The native field a refusal names -> the OpenAI parameter the client sent.
_NATIVE_TO_OPENAI = {"initImage": "image", "maskImage": "mask", "width": "size", "height": "size"}
FILE_RULE = "a PNG, JPEG or WebP image file"
IMAGE_FILE_RULE = "one image file (a multipart file part): PNG, JPEG or WebP"
MASK_RULE = "a PNG (or WebP) with an alpha channel: its transparent pixels are redrawn"


@dataclass(frozen=True)
class OpenAIRequest:
    job: GenerationRequest
    answer: AnswerOptions
    model: str | None  # None: the default model
    events: str  # the stream's event prefix: image_generation or image_edit


def parse_generation(data: object, *, max_batch: int, max_pixels: int) -> OpenAIRequest:
    """A JSON body of POST /images/generations, checked."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object with at least a prompt")
    fields = Fields(data)
    common = read_common(fields, max_batch=max_batch, max_pixels=max_pixels)
    model = requested_model(fields)
    width, height = common.size or auto_size(max_pixels)
    job = GenerationRequest(
        prompt=common.prompt,
        width=width,
        height=height,
        steps=common.steps,
        count=common.count,
        preview_every=preview_every(common.steps, common.answer.partial_images),
    )
    return OpenAIRequest(job, common.answer, model, "image_generation")


def parse_edit(form: Form, *, max_batch: int, max_pixels: int) -> OpenAIRequest:
    """A multipart body of POST /images/edits, checked; its images through the guarded
    reader (sizes from the headers, checked before any pixel is decoded)."""
    fields = Fields(form.fields, form=True)
    image = _one_file(form, IMAGE_FILES)
    if image is None:
        raise InvalidRequest("image is required", field="image", rule=IMAGE_FILE_RULE)
    mask = _one_file(form, ("mask",))
    common = read_common(fields, max_batch=max_batch, max_pixels=max_pixels)
    model = requested_model(fields)
    strength = MASKED_STRENGTH if mask is not None else UNMASKED_STRENGTH
    native: dict[str, object] = {"initImage": _b64(image), "strength": strength}
    if mask is not None:
        native["maskImage"] = _b64(redraw_mask(mask, max_pixels))
    try:
        edit = parse_edit_inputs(native, max_pixels)
        assert edit is not None  # an initImage was given
        width, height = common.size or default_size(edit.init, None, None, max_pixels)
    except InvalidRequest as exc:
        raise _renamed(exc) from None
    diffused = max(1, int(common.steps * strength))
    job = GenerationRequest(
        prompt=common.prompt,
        width=width,
        height=height,
        steps=common.steps,
        count=common.count,
        preview_every=preview_every(diffused, common.answer.partial_images),
        edit=edit,
    )
    return OpenAIRequest(job, common.answer, model, "image_edit")


def _one_file(form: Form, names: tuple[str, ...]) -> bytes | None:
    param = names[0]
    rule = IMAGE_FILE_RULE
    if any(name in form.fields for name in names):
        raise refuse(param, rule, "a text field")
    files = [data for name in names for data in form.files.get(name, [])]
    if len(files) > 1:
        raise refuse(param, rule + "; this server edits one image at a time", f"{len(files)}")
    return files[0] if files else None


def redraw_mask(data: bytes, max_pixels: int) -> bytes:
    """OpenAI's mask (transparent = redraw) as diffusiond's (a grey PNG, white = redraw)."""
    limit = max_pixels * INPUT_PIXELS_FACTOR
    try:
        with open_checked(data, max_pixels=limit) as picture:
            has_alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
        if not has_alpha:
            raise refuse("mask", MASK_RULE, f"a {picture.mode} image without transparency")
        rgba = read_image(data, max_pixels=limit, mode="RGBA")
    except ImageRejected as exc:
        raise refuse("mask", MASK_RULE + f", of at most {limit} pixels", str(exc)) from None
    buffer = io.BytesIO()
    ImageOps.invert(rgba.getchannel("A")).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _renamed(exc: InvalidRequest) -> InvalidRequest:
    """A native refusal, naming the OpenAI parameter instead of the native field."""
    native = exc.field or ""
    param = _NATIVE_TO_OPENAI.get(native, native) or None
    message = exc.message.replace(IMAGE_RULE, FILE_RULE)
    if native and param and native != param:
        message = message.replace(native, param, 1)
    rule = exc.details.get("rule")
    if isinstance(rule, str):
        rule = rule.replace(IMAGE_RULE, FILE_RULE)
    return InvalidRequest(message, field=param, rule=rule if isinstance(rule, str) else None)
