"""Which model a request names, and the list GET /openai/v1/models answers.

For now one model is served: it is listed under one id, and any name a request gives maps
to it (OpenAI clients send names like `gpt-image-1` or `dall-e-3` that mean nothing here).
`requested_model` is the one place to point at a models catalog once there is one.
"""

from __future__ import annotations

from pathlib import PurePath

from diffusiond.backends.base import BackendInfo
from diffusiond.compat.openai.params import Fields

OWNER = "diffusiond"
MAX_MODEL_NAME_CHARS = 256


def requested_model(fields: Fields) -> str | None:
    """The model to draw with for the request's `model` (checked to be a string): None, the
    default model, whatever the name."""
    fields.text("model", limit=MAX_MODEL_NAME_CHARS)
    return None


def served_model_id(info: BackendInfo) -> str:
    """The id the loaded model is listed under: its folder's or file's name, not a path."""
    return PurePath(info.model).name or info.model or OWNER


def model_body(model_id: str, created: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def model_list_body(model_id: str, created: int) -> dict[str, object]:
    return {"object": "list", "data": [model_body(model_id, created)]}
