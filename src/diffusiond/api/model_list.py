"""The body of GET /v1/models: the catalog, with which models are loaded and the default."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import PurePath

from diffusiond.api.ports import ModelDirectory
from diffusiond.backends.base import BackendInfo


def models_body(
    directory: ModelDirectory, loaded: Collection[str], *, with_paths: bool
) -> dict[str, object]:
    """Each model's id, architecture, format, whether it is loaded and whether it is the
    default; its absolute path only `with_paths` (the request carried the API key)."""
    listed: list[dict[str, object]] = []
    for entry in directory.entries():
        item: dict[str, object] = {
            "id": entry.id,
            "architecture": entry.architecture,
            "format": entry.format,
            "loaded": entry.id in loaded,
            "default": entry.id == directory.default_id,
        }
        if entry.components is not None:
            item["components"] = dict(entry.components.names)
        if with_paths:
            item["path"] = str(entry.path) if entry.path is not None else None
        listed.append(item)
    return {"models": listed}


def plugin_models_body(info: BackendInfo) -> dict[str, object]:
    """A plugin backend's one model, which every request goes to whatever it names."""
    model = {
        "id": PurePath(info.model).name,
        "architecture": info.architecture,
        "format": "plugin",
        "loaded": True,
        "default": True,
    }
    return {"models": [model]}
