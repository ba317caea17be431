"""Request validation and response rendering for the wire format (camelCase JSON)."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import orjson

from diffusiond.api.edit_fields import default_size, parse_edit_inputs
from diffusiond.api.params import int_param
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import (
    LORA_WEIGHT_LIMIT,
    MAX_LORAS,
    SAMPLERS,
    SCHEDULERS,
    GenerationRequest,
    Job,
    JobStatus,
    LoraWeight,
    Progress,
    Result,
    StageTimings,
)
from diffusiond.sampling import schedule_problem

MAX_TEXT_CHARS = 10_000
MAX_SEED = 2**32 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in_range(field: str, low: int, high: int, extra: str = "") -> Callable[[object], int]:
    rule = f"an integer from {low} to {high}{extra}"

    def check(value: object) -> int:
        if not _is_int(value):
            raise InvalidRequest(
                f"{field} must be {rule}, got {_show(value)}", field=field, rule=rule
            )
        assert isinstance(value, int)
        if not low <= value <= high:
            raise InvalidRequest(f"{field} must be {rule}, got {value}", field=field, rule=rule)
        return value

    return check


def _dimension(field: str) -> Callable[[object], int]:
    in_range = _int_in_range(field, 64, 2048, ", a multiple of 8")

    def check(value: object) -> int:
        number = in_range(value)
        if number % 8:
            rule = "an integer from 64 to 2048, a multiple of 8"
            raise InvalidRequest(f"{field} must be {rule}, got {number}", field=field, rule=rule)
        return number

    return check


def _text(field: str, *, required: bool) -> Callable[[object], str]:
    rule = f"a string of at most {MAX_TEXT_CHARS} characters"
    if required:
        rule = f"a non-empty string of at most {MAX_TEXT_CHARS} characters"

    def check(value: object) -> str:
        if not isinstance(value, str):
            raise InvalidRequest(
                f"{field} must be {rule}, got {_show(value)}", field=field, rule=rule
            )
        if required and not value.strip():
            raise InvalidRequest(
                f"{field} must not be empty or only whitespace", field=field, rule=rule
            )
        if len(value) > MAX_TEXT_CHARS:
            raise InvalidRequest(
                f"{field} must be {rule}, got {len(value)} characters", field=field, rule=rule
            )
        return value

    return check


def _cfg_scale(value: object) -> float:
    rule = "a number from 0 to 30"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(
            f"cfgScale must be {rule}, got {_show(value)}", field="cfgScale", rule=rule
        )
    if not math.isfinite(value) or not 0 <= value <= 30:
        raise InvalidRequest(f"cfgScale must be {rule}, got {value}", field="cfgScale", rule=rule)
    return float(value)


def _seed(value: object) -> int | None:
    rule = f"an integer from 0 to {MAX_SEED}, or -1 or null for a random seed"
    if not _is_int(value):
        raise InvalidRequest(f"seed must be {rule}, got {_show(value)}", field="seed", rule=rule)
    assert isinstance(value, int)
    if value == -1:
        return None
    if not 0 <= value <= MAX_SEED:
        raise InvalidRequest(f"seed must be {rule}, got {value}", field="seed", rule=rule)
    return value


def _sampler(value: object) -> str:
    rule = f"one of {', '.join(SAMPLERS)}"
    if not isinstance(value, str) or value not in SAMPLERS:
        raise InvalidRequest(
            f"sampler must be {rule}, got {_show(value)}", field="sampler", rule=rule
        )
    return value


def _scheduler(value: object) -> str:
    rule = f"one of {', '.join(SCHEDULERS)}"
    if not isinstance(value, str) or value not in SCHEDULERS:
        raise InvalidRequest(
            f"scheduler must be {rule}, got {_show(value)}", field="scheduler", rule=rule
        )
    return value


MAX_NAME_CHARS = 200  # a model id or a LoRA name


def _name(field: str) -> Callable[[object], str]:
    rule = f"a non-empty string of at most {MAX_NAME_CHARS} characters"

    def check(value: object) -> str:
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
            raise InvalidRequest(
                f"{field} must be {rule}, got {_show(value)}", field=field, rule=rule
            )
        return value

    return check


def _loras(value: object) -> tuple[LoraWeight, ...]:
    rule = (
        f'an array of at most {MAX_LORAS} objects {{"name": string, "weight": number from '
        f"-{LORA_WEIGHT_LIMIT:g} to {LORA_WEIGHT_LIMIT:g}}}, each name once"
    )

    def refuse(detail: str) -> InvalidRequest:
        return InvalidRequest(f"loras must be {rule}: {detail}", field="loras", rule=rule)

    if not isinstance(value, list):
        raise refuse(f"got {_show(value)}")
    if len(value) > MAX_LORAS:
        raise refuse(f"got {len(value)} entries")
    loras: list[LoraWeight] = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) - {"name", "weight"}:
            raise refuse(f"entry {index} is not such an object")
        name = entry.get("name")
        weight = entry.get("weight", 1.0)
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise refuse(f"entry {index} has no valid name")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or abs(weight) > LORA_WEIGHT_LIMIT
        ):
            raise refuse(f"entry {index} ({name!r}) has weight {_show(weight)}")
        if any(lora.name == name for lora in loras):
            raise refuse(f"{name!r} is given twice")
        loras.append(LoraWeight(name, float(weight)))
    return tuple(loras)


def _preview_every(preview: object, every: object) -> int:
    """`preview: true` is a preview every step; `previewEvery: N` one every N steps."""
    if preview is not None and not isinstance(preview, bool):
        rule = "true or false"
        raise InvalidRequest(
            f"preview must be {rule}, got {_show(preview)}", field="preview", rule=rule
        )
    steps = _int_in_range("previewEvery", 1, 150)(every) if every is not None else None
    if preview is False:
        return 0
    if steps is not None:
        return steps
    return 1 if preview else 0


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return repr(shown)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    return "an object"


DEFAULT_MAX_PIXELS = 1024 * 1024


def parse_generation_request(
    body: bytes, *, max_batch: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> GenerationRequest:
    """Validate a POST body into a request; every error names the field and the rule."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object with at least a prompt")
    if data.get("prompt") is None:
        raise InvalidRequest(
            "prompt is required",
            field="prompt",
            rule=f"a non-empty string of at most {MAX_TEXT_CHARS} characters",
        )

    fields: dict[str, tuple[str, Callable[[object], Any]]] = {
        "prompt": ("prompt", _text("prompt", required=True)),
        "negativePrompt": ("negative_prompt", _text("negativePrompt", required=False)),
        "width": ("width", _dimension("width")),
        "height": ("height", _dimension("height")),
        "steps": ("steps", _int_in_range("steps", 1, 150)),
        "cfgScale": ("cfg_scale", _cfg_scale),
        "seed": ("seed", _seed),
        "sampler": ("sampler", _sampler),
        "count": ("count", _int_in_range("count", 1, max_batch)),
        "model": ("model", _name("model")),
        "loras": ("loras", _loras),
        "scheduler": ("scheduler", _scheduler),
        "clipSkip": ("clip_skip", _int_in_range("clipSkip", 1, 12)),
    }
    values: dict[str, Any] = {}
    for wire_name, (name, check) in fields.items():
        raw = data.get(wire_name)
        if raw is not None:  # null means "use the default"
            values[name] = check(raw)
    values["preview_every"] = _preview_every(data.get("preview"), data.get("previewEvery"))
    edit = parse_edit_inputs(data, max_pixels)
    if edit is not None:
        values["edit"] = edit
        if "width" not in values or "height" not in values:
            values["width"], values["height"] = default_size(
                edit.init, values.get("width"), values.get("height"), max_pixels
            )
    request = GenerationRequest(**values)
    _check_pixel_budget(request, max_pixels)
    _check_schedule(request)
    return request


MAX_LIST_LIMIT = 10_000


def parse_list_query(
    statuses: list[str], limits: list[str]
) -> tuple[frozenset[JobStatus] | None, int | None]:
    """`?status=a,b` (or repeated) and `?limit=N` of the list endpoint, checked."""
    wanted: set[JobStatus] = set()
    for raw in statuses:
        for name in raw.split(","):
            try:
                wanted.add(JobStatus(name.strip()))
            except ValueError:
                choices = ", ".join(status.value for status in JobStatus)
                raise InvalidRequest(
                    f"status must be one or more of {choices} (comma-separated), "
                    f"got {_show(name.strip())}",
                    field="status",
                    rule=f"one or more of: {choices}",
                ) from None
    limit = None
    if limits:
        if len(limits) > 1:
            raise InvalidRequest("limit may be given once", field="limit", rule="given once")
        limit = int_param(limits[0], name="limit", low=1, high=MAX_LIST_LIMIT)
    return (frozenset(wanted) if wanted else None), limit


def _check_schedule(request: GenerationRequest) -> None:
    problem = schedule_problem(request.sampler, request.scheduler)
    if problem is not None:
        rule = f"with sampler {request.sampler}: one of " + ", ".join(
            name for name in SCHEDULERS if schedule_problem(request.sampler, name) is None
        )
        raise InvalidRequest(problem, field="scheduler", rule=rule)


def _check_pixel_budget(request: GenerationRequest, max_pixels: int) -> None:
    pixels = request.width * request.height
    if pixels > max_pixels:
        rule = f"width x height of at most {max_pixels} pixels"
        raise InvalidRequest(
            f"width x height must be at most {max_pixels} pixels (this server's "
            f"IMAGE_MAX_PIXELS), got {request.width}x{request.height} = {pixels}",
            field="width",
            rule=rule,
        )


# -- rendering ---------------------------------------------------------------------------


def dump(payload: object) -> bytes:
    return orjson.dumps(payload)


def progress_body(progress: Progress) -> dict[str, object]:
    body: dict[str, object] = {
        "currentStep": progress.current_step,
        "totalSteps": progress.total_steps,
        "stage": progress.stage.value,
        "percentage": progress.percentage,
        "currentImage": progress.current_image,
        "totalImages": progress.total_images,
    }
    if progress.eta_ms is not None:
        body["etaMs"] = progress.eta_ms
    if progress.preview is not None:
        preview = progress.preview
        body["preview"] = {
            "image": base64.b64encode(preview.jpeg).decode("ascii"),
            "format": "jpeg",
            "width": preview.width,
            "height": preview.height,
            "step": preview.step,
        }
    return body


def result_body(result: Result) -> dict[str, object]:
    return {
        "images": [
            {
                "image": base64.b64encode(image.png).decode("ascii"),
                "seed": image.seed,
                "width": image.width,
                "height": image.height,
            }
            for image in result.images
        ],
        "format": result.format,
        "timeTaken": result.time_taken_ms,
        **({"timings": timings_body(result.timings)} if result.timings is not None else {}),
    }


def timings_body(timings: StageTimings) -> dict[str, int]:
    return {
        "loadingMs": timings.loading_ms,
        "diffusionMs": timings.diffusion_ms,
        "decodingMs": timings.decoding_ms,
        "encodingMs": timings.encoding_ms,
    }


def summary_body(job: Job) -> dict[str, object]:
    return {
        "id": job.id,
        "status": job.status.value,
        "createdAt": job.created_at,
        "updatedAt": job.updated_at,
    }


def job_body(job: Job, queue_position: int | None = None) -> dict[str, object]:
    body = summary_body(job)
    if queue_position is not None and job.status is JobStatus.PENDING:
        body["queuePosition"] = queue_position
    if job.status is JobStatus.IN_PROGRESS and job.progress is not None:
        body["progress"] = progress_body(job.progress)
    if job.result is not None:
        body["result"] = result_body(job.result)
    if job.error is not None:
        body["error"] = {"message": job.error.message, "code": job.error.code.value}
    return body
