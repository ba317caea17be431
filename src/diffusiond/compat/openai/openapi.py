"""The OpenAI Images API's part of the OpenAPI document (merged into /openapi.json)."""

from __future__ import annotations

from typing import Any

from diffusiond.compat.openai.params import (
    IGNORED_CHOICES,
    MAX_PARTIAL_IMAGES,
    MAX_PROMPT_CHARS,
    OUTPUT_FORMATS,
    QUALITY_STEPS,
    RESPONSE_FORMATS,
)
from diffusiond.compat.openai.routes import PREFIX


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("OpenAIError")}},
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema["type"]
    out = {**schema, "type": [kind, "null"]}
    if "enum" in schema:
        out["enum"] = [*schema["enum"], None]
    return out


def _common_fields(max_batch: int) -> dict[str, Any]:
    steps = ", ".join(f"{name} {steps}" for name, steps in QUALITY_STEPS.items())
    fields: dict[str, Any] = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
        "model": _nullable(
            {"type": "string", "maxLength": 256, "description": "any name: the served model"}
        ),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": max_batch}),
        "size": _nullable(
            {
                "type": "string",
                "description": "auto, or WIDTHxHEIGHT: sides 64..2048, multiples of 8, "
                "within the server's pixel budget",
            }
        ),
        "quality": _nullable(
            {"type": "string", "enum": list(QUALITY_STEPS), "description": f"steps: {steps}"}
        ),
        "response_format": _nullable({"type": "string", "enum": list(RESPONSE_FORMATS)}),
        "output_format": _nullable({"type": "string", "enum": list(OUTPUT_FORMATS)}),
        "output_compression": _nullable(
            {"type": "integer", "minimum": 0, "maximum": 100, "description": "JPEG/WebP quality"}
        ),
        "stream": _nullable({"type": "boolean"}),
        "partial_images": _nullable(
            {"type": "integer", "minimum": 0, "maximum": MAX_PARTIAL_IMAGES}
        ),
        "user": _nullable({"type": "string", "maxLength": 256, "description": "ignored"}),
    }
    for name, choices in IGNORED_CHOICES.items():
        ignored = {"type": "string", "enum": list(choices), "description": "ignored"}
        fields[name] = _nullable(ignored)
    return fields


def openai_schemas(max_batch: int) -> dict[str, Any]:
    common = _common_fields(max_batch)
    edit_fields = {
        **{name: value for name, value in common.items() if name != "prompt"},
        "prompt": common["prompt"],
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "a PNG with alpha of the image's size: transparent = redraw",
        },
    }
    return {
        "OpenAIImageGeneration": {
            "type": "object",
            "required": ["prompt"],
            "properties": common,
        },
        "OpenAIImageEdit": {
            "type": "object",
            "required": ["prompt", "image"],
            "properties": edit_fields,
        },
        "OpenAIImagesResponse": {
            "type": "object",
            "required": ["created", "data"],
            "properties": {
                "created": {"type": "integer"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"b64_json": {"type": "string"}, "url": {"type": "string"}},
                    },
                },
                "background": {"type": "string"},
                "output_format": {"type": "string"},
                "size": {"type": "string"},
                "quality": {"type": "string"},
            },
        },
        "OpenAIModel": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["model"]},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            },
        },
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                },
            },
        },
    }


# One server-sent event: its name, and its JSON data (an event body, or an error).
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}


def _answers(unauthorized: dict[str, Any]) -> dict[str, Any]:
    return {
        "200": {
            "description": "the finished images; with stream: true, server-sent events "
            "(<kind>.partial_image..., then <kind>.completed per image, or error)",
            "content": {
                "application/json": {"schema": _ref("OpenAIImagesResponse")},
                "text/event-stream": {"schema": _EVENT},
            },
        },
        "400": _error("a parameter breaks a rule (`param` names it)"),
        "404": _error("no such endpoint"),
        "409": _error("the job was cancelled by someone else"),
        "413": _error("the body is over the limit"),
        "429": _error("busy: retry after the seconds in Retry-After"),
        "500": _error("the job failed"),
        "503": _error("the model is not ready, or the store failed"),
        **unauthorized,
    }


def openai_paths(unauthorized: dict[str, Any]) -> dict[str, Any]:
    """The /openai/v1 operations; `unauthorized`: the 401/403 answers of every operation."""
    model_answer = {
        "description": "a model",
        "content": {"application/json": {"schema": _ref("OpenAIModel")}},
    }
    listing = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _ref("OpenAIModel")},
        },
    }
    return {
        f"{PREFIX}/images/generations": {
            "post": {
                "operationId": "openaiCreateImage",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("OpenAIImageGeneration")}},
                },
                "responses": _answers(unauthorized),
            }
        },
        f"{PREFIX}/images/edits": {
            "post": {
                "operationId": "openaiEditImage",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _ref("OpenAIImageEdit")}},
                },
                "responses": _answers(unauthorized),
            }
        },
        f"{PREFIX}/models": {
            "get": {
                "operationId": "openaiListModels",
                "responses": {
                    "200": {
                        "description": "the served model",
                        "content": {"application/json": {"schema": listing}},
                    },
                    **unauthorized,
                },
            }
        },
        f"{PREFIX}/models/{{model}}": {
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "operationId": "openaiRetrieveModel",
                "responses": {
                    "200": model_answer,
                    "404": _error("not the served model's id"),
                    **unauthorized,
                },
            },
        },
    }
