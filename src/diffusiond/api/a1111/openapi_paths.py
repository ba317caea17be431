"""The /sdapi/v1 operations of the OpenAPI document (the rules are in docs/API.md,
"AUTOMATIC1111 API")."""

from __future__ import annotations

from typing import Any

from diffusiond.api.a1111.names import PREFIX, SAMPLER_TABLE, SCHEDULER_TABLE
from diffusiond.api.a1111.parse import MAX_MASK_BLUR, MAX_N_ITER, MAX_SEED, MAX_TEXT_CHARS

_ERROR = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "error": {"type": "string", "description": "the error's class, e.g. InvalidRequest"},
        "detail": {"description": "what is wrong; the field and rule by name"},
        "body": {"type": "string"},
        "errors": {"type": "string"},
        "field": {"type": "string", "description": "the A1111 field at fault"},
        "rule": {"type": "string", "description": "the rule it broke"},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    said = {
        "400": "a field breaks its rule (named in `field` and `rule`)",
        "404": "no such route",
        "405": "another method",
        "413": "the body is over the limit",
        "500": "a job of the call failed (its message in `detail`)",
        "503": "still busy after the wait limit (Retry-After), or the model is not ready",
    }
    return {status: _json(_ERROR, said[status]) for status in statuses}


def _generation_request(img2img: bool) -> dict[str, Any]:
    integer, number, text = {"type": "integer"}, {"type": "number"}, {"type": "string"}
    properties: dict[str, Any] = {
        "prompt": {**text, "maxLength": MAX_TEXT_CHARS, "description": "<lora:name:w> tags"},
        "negative_prompt": {**text, "maxLength": MAX_TEXT_CHARS},
        "seed": {**integer, "minimum": -1, "maximum": MAX_SEED, "description": "-1: random"},
        "steps": {**integer, "minimum": 1, "maximum": 150, "default": 50},
        "cfg_scale": {**number, "minimum": 0, "maximum": 30, "default": 7},
        "width": {**integer, "minimum": 64, "maximum": 2048, "multipleOf": 8, "default": 512},
        "height": {**integer, "minimum": 64, "maximum": 2048, "multipleOf": 8, "default": 512},
        "batch_size": {**integer, "minimum": 1, "description": "images per job"},
        "n_iter": {**integer, "minimum": 1, "maximum": MAX_N_ITER, "description": "jobs"},
        "sampler_name": {**text, "examples": [entry.name for entry in SAMPLER_TABLE]},
        "scheduler": {**text, "examples": [entry.label for entry in SCHEDULER_TABLE]},
        "override_settings": {
            "type": "object",
            "properties": {
                "sd_model_checkpoint": text,
                "CLIP_stop_at_last_layers": {**integer, "minimum": 1, "maximum": 12},
            },
        },
        "send_images": {"type": "boolean", "default": True},
    }
    if img2img:
        properties |= {
            "init_images": {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
            "mask": {**text, "description": "white = redraw, black = keep"},
            "denoising_strength": {**number, "minimum": 0, "maximum": 1, "default": 0.75},
            "mask_blur": {**integer, "minimum": 0, "maximum": MAX_MASK_BLUR, "default": 4},
            "inpainting_mask_invert": {**integer, "enum": [0, 1]},
            "resize_mode": {**integer, "minimum": 0, "maximum": 3, "default": 0},
        }
    required = ["init_images"] if img2img else []
    return {"type": "object", "required": required, "properties": properties}


_GENERATION_RESPONSE = {
    "type": "object",
    "required": ["images", "parameters", "info"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "base64 PNG"}},
        "parameters": {"type": "object"},
        "info": {"type": "string", "description": "JSON: seed, all_seeds, infotexts, job_ids"},
    },
}


def _generate(operation_id: str, img2img: bool) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _generation_request(img2img)}},
            },
            "responses": {
                "200": _json(_GENERATION_RESPONSE, "the images, once every job has ended"),
                **_errors("400", "413", "500", "503"),
            },
        }
    }


def _get(operation_id: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "responses": {"200": _json(schema, description)},
        }
    }


def _post_empty(operation_id: str, description: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "responses": {"200": _json({"type": "object"}, description)},
        }
    }


_LIST = {"type": "array", "items": {"type": "object"}}
_PROGRESS = {
    "type": "object",
    "required": ["progress", "eta_relative", "state"],
    "properties": {
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "eta_relative": {"type": "number"},
        "state": {"type": "object"},
        "current_image": {"type": ["string", "null"], "description": "base64 JPEG preview"},
        "textinfo": {"type": ["string", "null"]},
    },
}


def _options_item() -> dict[str, Any]:
    options = {"type": "object", "properties": {"sd_model_checkpoint": {"type": "string"}}}
    return {
        **_get("a1111Options", options, "the settings this API knows"),
        "post": {
            "operationId": "a1111SetOptions",
            "requestBody": {"content": {"application/json": {"schema": options}}},
            "responses": {
                "200": _json({"type": "null"}, "set"),
                **_errors("400", "413"),
            },
        },
    }


def _png_info_item() -> dict[str, Any]:
    return {
        "post": {
            "operationId": "a1111PngInfo",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {"image": {"type": "string"}},
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "info": {"type": "string"},
                            "items": {"type": "object"},
                            "parameters": {"type": "object"},
                        },
                    },
                    "the image's parameters text, parsed",
                ),
                **_errors("400", "413"),
            },
        }
    }


def a1111_paths() -> dict[str, Any]:
    """The AUTOMATIC1111 operations, keyed by their full paths."""
    paths: dict[str, Any] = {
        "/txt2img": _generate("a1111Txt2img", img2img=False),
        "/img2img": _generate("a1111Img2img", img2img=True),
        "/progress": {
            "get": {
                "operationId": "a1111Progress",
                "parameters": [
                    {
                        "name": "skip_current_image",
                        "in": "query",
                        "schema": {"type": "boolean"},
                    }
                ],
                "responses": {"200": _json(_PROGRESS, "the call being followed, or idle")},
            }
        },
        "/interrupt": _post_empty("a1111Interrupt", "the running call stops"),
        "/skip": _post_empty("a1111Skip", "the running iteration is dropped"),
        "/sd-models": _get("a1111SdModels", _LIST, "title, model_name, hash, sha256"),
        "/samplers": _get("a1111Samplers", _LIST, "name, aliases, options"),
        "/schedulers": _get("a1111Schedulers", _LIST, "name, label"),
        "/loras": _get("a1111Loras", _LIST, "name, alias, path"),
        "/upscalers": _get("a1111Upscalers", _LIST, "always empty"),
        "/sd-vae": _get("a1111SdVae", _LIST, "always empty: each model's own VAE is used"),
        "/scripts": _get(
            "a1111Scripts",
            {"type": "object", "properties": {"txt2img": _LIST, "img2img": _LIST}},
            "always {txt2img: [], img2img: []}",
        ),
        "/options": _options_item(),
        "/png-info": _png_info_item(),
    }
    return {PREFIX + path: item for path, item in paths.items()}
