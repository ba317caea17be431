"""Which model a request names, and the list GET /openai/v1/models answers.

A request's `model` that is an id of the server's catalog (GET /v1/models) draws with that
model; any other name (OpenAI clients send `gpt-image-1` or `dall-e-3`, which mean nothing
here) draws with the default model. A plugin backend without a catalog lists its one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

from diffusiond.backends.base import BackendInfo
from diffusiond.compat.openai.params import Fields

OWNER = "diffusiond"
MAX_MODEL_NAME_CHARS = 256


def requested_model(fields: Fields) -> str | None:
    """The request's `model` as given (checked to be a string); None when it has none."""
    return fields.text("model", limit=MAX_MODEL_NAME_CHARS) or None


def catalog_model(name: str | None, catalog_ids: Sequence[str]) -> str | None:
    """The model to draw with: `name` where it is one of the catalog's ids, else None (the
    default model)."""
    return name if name is not None and name in catalog_ids else None


def served_model_id(info: BackendInfo) -> str:
    """The id the loaded model is listed under: its folder's or file's name, not a path."""
    return PurePath(info.model).name or info.model or OWNER


def model_body(model_id: str, created: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def model_list_body(model_ids: Sequence[str], created: int) -> dict[str, object]:
    return {"object": "list", "data": [model_body(model_id, created) for model_id in model_ids]}
