"""The OpenAPI 3.1 document of the HTTP API (served at /openapi.json, fuzzed in CI)."""

from __future__ import annotations

from typing import Any

from diffusiond import __version__
from diffusiond.api.a1111.openapi_paths import a1111_paths
from diffusiond.api.openapi_models import model_paths, model_schemas
from diffusiond.api.schemas import MAX_NAME_CHARS, MAX_SEED, MAX_TEXT_CHARS
from diffusiond.compat.openai.openapi import openai_paths, openai_schemas
from diffusiond.jobs.models import LORA_WEIGHT_LIMIT, MAX_LORAS, SAMPLERS, SCHEDULERS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_STATUS = {"type": "string", "enum": ["pending", "in_progress", "complete", "error", "cancelled"]}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _schemas(max_batch: int) -> dict[str, Any]:
    nullable_int = {"type": ["integer", "null"]}
    return {
        "GenerationRequest": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS},
                "negativePrompt": {"type": ["string", "null"], "maxLength": MAX_TEXT_CHARS},
                "width": {**nullable_int, "minimum": 64, "maximum": 2048, "multipleOf": 8},
                "height": {**nullable_int, "minimum": 64, "maximum": 2048, "multipleOf": 8},
                "steps": {**nullable_int, "minimum": 1, "maximum": 150},
                "cfgScale": {"type": ["number", "null"], "minimum": 0, "maximum": 30},
                "seed": {**nullable_int, "minimum": -1, "maximum": MAX_SEED},
                "sampler": {"type": ["string", "null"], "enum": [*SAMPLERS, None]},
                "count": {**nullable_int, "minimum": 1, "maximum": max_batch},
                "model": {
                    "type": ["string", "null"],
                    "minLength": 1,
                    "maxLength": MAX_NAME_CHARS,
                    "description": "a model id of GET /v1/models; null: the default model; "
                    "an unknown id is a 400 naming `model`",
                },
                "loras": {
                    "type": ["array", "null"],
                    "maxItems": MAX_LORAS,
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
                            "weight": {
                                "type": "number",
                                "minimum": -LORA_WEIGHT_LIMIT,
                                "maximum": LORA_WEIGHT_LIMIT,
                            },
                        },
                    },
                    "description": "LoRAs of GET /v1/loras to apply, each name once",
                },
                "scheduler": {
                    "type": ["string", "null"],
                    "enum": [*SCHEDULERS, None],
                    "description": "the noise schedule; karras and exponential not with "
                    "euler_a, lcm, ddim; sgm_uniform and simple not with dpm++2s_a, lcm "
                    "(a 400 naming scheduler)",
                },
                "clipSkip": {**nullable_int, "minimum": 1, "maximum": 12},
                "preview": {
                    "type": ["boolean", "null"],
                    "description": "live previews in progress.preview, after every step",
                },
                "previewEvery": {
                    **nullable_int,
                    "minimum": 1,
                    "maximum": 150,
                    "description": "live previews every this many diffusion steps",
                },
                "initImage": {
                    "type": ["string", "null"],
                    "description": "base64 (or a data:image/...;base64, URL) of a PNG, JPEG "
                    "or WebP image: image-to-image; without width/height the output takes "
                    "its size rounded down to a multiple of 8",
                },
                "strength": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "maximum": 1,
                    "description": "how much of initImage is redrawn (default 0.75); "
                    "only with initImage; runs max(1, int(steps x strength)) steps",
                },
                "maskImage": {
                    "type": ["string", "null"],
                    "description": "base64 PNG/JPEG/WebP of initImage's size: white (opaque) "
                    "= redraw, black (transparent) = keep exactly; only with initImage",
                },
                "maskBlur": {
                    **nullable_int,
                    "minimum": 0,
                    "maximum": 64,
                    "description": "pixels the mask's edge is feathered over (default 4); "
                    "only with maskImage",
                },
            },
        },
        "Created": {
            "type": "object",
            "required": ["id", "status", "createdAt"],
            "properties": {
                "id": {"type": "string"},
                "status": _STATUS,
                "createdAt": {"type": "integer"},
            },
        },
        "Summary": {
            "type": "object",
            "required": ["id", "status", "createdAt", "updatedAt"],
            "properties": {
                "id": {"type": "string"},
                "status": _STATUS,
                "createdAt": {"type": "integer"},
                "updatedAt": {"type": "integer"},
            },
        },
        "Progress": {
            "type": "object",
            "required": [
                "currentStep",
                "totalSteps",
                "stage",
                "percentage",
                "currentImage",
                "totalImages",
            ],
            "properties": {
                "currentStep": {"type": "integer", "minimum": 0},
                "totalSteps": {"type": "integer", "minimum": 0},
                "stage": {"type": "string", "enum": ["loading", "diffusion", "decoding"]},
                "percentage": {"type": "number", "minimum": 0, "maximum": 100},
                "currentImage": {"type": "integer", "minimum": 1},
                "totalImages": {"type": "integer", "minimum": 1},
                "etaMs": {"type": "integer", "minimum": 0},
                "preview": {
                    "type": "object",
                    "required": ["image", "format", "width", "height", "step"],
                    "properties": {
                        "image": {"type": "string", "contentEncoding": "base64"},
                        "format": {"const": "jpeg"},
                        "width": {"type": "integer", "maximum": 128},
                        "height": {"type": "integer", "maximum": 128},
                        "step": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
        "Image": {
            "type": "object",
            "required": ["image", "seed", "width", "height"],
            "properties": {
                "image": {"type": "string", "contentEncoding": "base64"},
                "seed": {"type": "integer"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
            },
        },
        "Generation": {
            "allOf": [_ref("Summary")],
            "properties": {
                "queuePosition": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "while pending in a bounded queue: 1 runs next",
                },
                "progress": _ref("Progress"),
                "result": {
                    "type": "object",
                    "required": ["images", "format", "timeTaken"],
                    "properties": {
                        "images": {"type": "array", "items": _ref("Image")},
                        "format": {"const": "png"},
                        "timeTaken": {"type": "integer"},
                        "timings": {
                            "type": "object",
                            "properties": {
                                name: {"type": "integer", "minimum": 0}
                                for name in (
                                    "loadingMs",
                                    "diffusionMs",
                                    "decodingMs",
                                    "encodingMs",
                                )
                            },
                        },
                    },
                },
                "error": {
                    "type": "object",
                    "required": ["message", "code"],
                    "properties": {"message": {"type": "string"}, "code": {"type": "string"}},
                },
            },
        },
        "Cancelled": {
            "type": "object",
            "required": ["id", "status"],
            "properties": {"id": {"type": "string"}, "status": {"const": "cancelled"}},
        },
        "Samplers": {
            "type": "object",
            "required": ["samplers", "schedulers"],
            "properties": {
                "samplers": {"type": "array", "items": {"type": "string", "enum": [*SAMPLERS]}},
                "schedulers": {
                    "type": "array",
                    "items": {"type": "string", "enum": [*SCHEDULERS]},
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "busy", "pollIntervalMs"],
            "properties": {
                "status": {"const": "ok"},
                "busy": {"type": "boolean"},
                "pollIntervalMs": {"type": "integer", "minimum": 1},
                "maxBatch": {"type": "integer", "minimum": 1},
                "version": {"type": "string"},
                "openStreams": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "with the key: event streams and waits open now",
                },
                "loadedModels": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "with the key: the ids of the models loaded now (in broker "
                    "mode, on any worker), the least recently used first",
                },
                "components": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "with the key: the default model's split component files "
                    "by role ({} for any other model)",
                },
            },
            "description": "without the API key (where one is set) only status, busy, "
            "pollIntervalMs, maxBatch and version",
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "code": {"type": "string"},
                        "suggestion": {"type": "string"},
                        "details": {"type": "object"},
                    },
                },
            },
        },
    }


_LORA_LIST = {
    "type": "object",
    "required": ["loras"],
    "properties": {
        "loras": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "architecture"],
                "properties": {
                    "name": {"type": "string", "description": "the file's stem"},
                    "architecture": {"enum": ["sd1", "sd2", "sdxl", "unknown"]},
                },
            },
        }
    },
}


def openapi_document(*, max_batch: int, secured: bool) -> dict[str, Any]:
    """The document for a server with these settings."""
    unauthorized = {"401": _error("missing or wrong API key")} if secured else {}
    # Every operation: a Host this server does not answer to, or a foreign Origin.
    unauthorized["403"] = _error("FORBIDDEN_HOST or FORBIDDEN_ORIGIN: another site's request")
    paths: dict[str, Any] = {
        "/v1/images/generations": {
            "post": {
                "operationId": "startGeneration",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "description": "repeat a POST safely: the same key returns the same job",
                        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                    },
                    {
                        "name": "Prefer",
                        "in": "header",
                        "description": "wait=N (N <= 60): answer once the job ends, or after N s",
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("GenerationRequest")}},
                },
                "responses": {
                    "200": _json(
                        _ref("Generation"), "a replayed Idempotency-Key, or Prefer: wait met"
                    ),
                    "201": {
                        **_json(_ref("Created"), "accepted; poll the Location"),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    "400": _error("a field breaks a rule"),
                    "409": _error("the Idempotency-Key was used for a different body"),
                    "413": _error("the body is over the server's max body bytes (default 24 MiB)"),
                    "503": _error(
                        "busy, every stream slot held (Prefer: wait), the store failed (all "
                        "with Retry-After), or the model is not ready"
                    ),
                    **unauthorized,
                },
            },
            "get": {
                "operationId": "listGenerations",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "description": "only jobs in these statuses, comma-separated",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "at most this many jobs",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["generations"],
                            "properties": {
                                "generations": {"type": "array", "items": _ref("Summary")}
                            },
                        },
                        "newest first, without results",
                    ),
                    "400": _error("a bad status or limit"),
                    **unauthorized,
                },
            },
        },
        "/v1/images/generations/{id}": {
            "parameters": [_ID_PARAM],
            "get": {
                "operationId": "getGeneration",
                "responses": {
                    "200": _json(_ref("Generation"), "the job's state"),
                    "404": _error("unknown or expired id"),
                    **unauthorized,
                },
            },
            "delete": {
                "operationId": "cancelGeneration",
                "responses": {
                    "200": _json(_ref("Cancelled"), "cancelled (idempotent)"),
                    "404": _error("unknown or expired id"),
                    "409": _error("already complete or failed"),
                    "503": _error("the store could not save the change (with Retry-After)"),
                    **unauthorized,
                },
            },
        },
        "/v1/images/generations/{id}/events": {
            "parameters": [_ID_PARAM],
            "get": {
                "operationId": "generationEvents",
                "parameters": [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "resume: only states newer than this event id (a value "
                        "that is not one is ignored)",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "server-sent events: progress..., then the final state",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "404": _error("unknown or expired id"),
                    "503": _error("every stream slot is held (with Retry-After)"),
                    **unauthorized,
                },
            },
        },
        "/v1/images/generations/{id}/images/{index}": {
            "parameters": [
                _ID_PARAM,
                {
                    "name": "index",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "get": {
                "operationId": "generationImage",
                "responses": {
                    "200": {
                        "description": "the PNG, with its recipe in a text chunk",
                        "content": {"image/png": {"schema": {"type": "string"}}},
                    },
                    "404": _error("unknown id, not complete yet, or no such image"),
                    **unauthorized,
                },
            },
        },
        "/v1/loras": {
            "get": {
                "operationId": "listLoras",
                "responses": {
                    "200": _json(_LORA_LIST, "the LoRA folder's LoRAs, by name"),
                    **unauthorized,
                },
            },
        },
        "/v1/samplers": {
            "get": {
                "operationId": "listSamplers",
                "responses": {
                    "200": _json(_ref("Samplers"), "the sampler and scheduler names"),
                    **unauthorized,
                },
            },
        },
        "/health": {
            "get": {
                "operationId": "health",
                "responses": {
                    "200": _json(_ref("Health"), "ready"),
                    "503": _error("the model is loading or failed to load"),
                    "403": unauthorized["403"],
                },
            },
        },
    }
    paths |= a1111_paths()  # /sdapi/v1, the AUTOMATIC1111 API
    paths |= openai_paths(unauthorized)  # the OpenAI Images API, /openai/v1
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "diffusiond", "version": __version__},
        "paths": paths | model_paths(unauthorized),
        "components": {
            "schemas": _schemas(max_batch) | model_schemas() | openai_schemas(max_batch)
        },
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
