"""The JSON form of a request's editing inputs, for the job store and the broker's Redis.

The images travel as base64 of the bytes received (4/3 of their size): a stored or queued
edit job costs about its request body, which `--max-body-bytes` bounds.
"""

from __future__ import annotations

import base64
from typing import Any

from diffusiond.jobs.models import EditInputs, InputImage


def _image_to_json(image: InputImage) -> list[Any]:
    return [base64.b64encode(image.data).decode("ascii"), image.width, image.height]


def _image_from_json(data: list[Any]) -> InputImage:
    encoded, width, height = data
    return InputImage(base64.b64decode(encoded), int(width), int(height))


def edit_to_json(edit: EditInputs) -> dict[str, Any]:
    return {
        "init": _image_to_json(edit.init),
        "strength": edit.strength,
        "mask": _image_to_json(edit.mask) if edit.mask is not None else None,
        "maskBlur": edit.mask_blur,
    }


def edit_from_json(data: dict[str, Any] | None) -> EditInputs | None:
    if data is None:
        return None
    mask = data.get("mask")
    return EditInputs(
        init=_image_from_json(data["init"]),
        strength=float(data["strength"]),
        mask=_image_from_json(mask) if mask is not None else None,
        mask_blur=int(data["maskBlur"]),
    )
