"""The OpenAPI parts of GET /v1/models (api/model_list.py), merged into api/openapi.py's."""

from __future__ import annotations

from typing import Any

from diffusiond.backends.catalog import FORMATS

_MODEL = {"$ref": "#/components/schemas/Model"}


def model_schemas() -> dict[str, Any]:
    return {
        "Model": {
            "type": "object",
            "required": ["id", "architecture", "format", "loaded", "default"],
            "properties": {
                "id": {"type": "string", "description": "what a request's `model` takes"},
                "architecture": {
                    "type": "string",
                    "description": "sd1, sd2, sdxl, a flow family (flux1, flux2, sd3, zimage, "
                    "qwenimage, chroma), or unknown where it cannot be told cheaply",
                },
                "format": {"type": "string", "enum": [*FORMATS, "plugin"]},
                "loaded": {"type": "boolean", "description": "in memory now (on any worker)"},
                "default": {"type": "boolean", "description": "what a request without model uses"},
                "components": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "format components only: each role's file name "
                    "(diffusion_model, vae, clip_l, clip_g, t5xxl, llm)",
                },
                "path": {
                    "type": ["string", "null"],
                    "description": "only where the request carries the API key; null: built-in",
                },
            },
        },
        "Models": {
            "type": "object",
            "required": ["models"],
            "properties": {"models": {"type": "array", "items": _MODEL}},
        },
    }


def model_paths(unauthorized: dict[str, Any]) -> dict[str, Any]:
    return {
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "the models of the models dir and the built-in one (rescanned)",
                "responses": {
                    "200": {
                        "description": "every model a request may name",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Models"},
                            }
                        },
                    },
                    **unauthorized,
                },
            },
        },
    }
