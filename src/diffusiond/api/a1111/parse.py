"""An AUTOMATIC1111 txt2img or img2img body, checked, as the diffusiond jobs it makes.

Fields keep A1111's names in every error (`sampler_name`, `init_images`, ...). Fields that
only tune A1111's own machinery (subseed, eta, s_churn, styles, ...) are accepted and have
no effect; the few that ask for something this server does not do are refused with a 400
rather than silently dropped (see docs/API.md, "AUTOMATIC1111 API").
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from diffusiond.api.a1111.names import Checkpoint, map_checkpoint, map_sampler, split_lora_tags
from diffusiond.api.edit_fields import read_input_image
from diffusiond.errors import InvalidRequest
from diffusiond.images_in import read_image
from diffusiond.imaging import encode_png
from diffusiond.jobs.models import EditInputs, InputImage

MAX_TEXT_CHARS = 10_000
MAX_SEED = 2**32 - 1
MAX_N_ITER = 100
MAX_MASK_BLUR = 64
# A1111's API defaults for fields a body leaves out.
DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "seed": -1,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "batch_size": 1,
    "n_iter": 1,
    "sampler_name": "Euler a",
    "scheduler": "Automatic",
    "denoising_strength": 0.75,
    "mask_blur": 4,
    "inpainting_mask_invert": 0,
    "resize_mode": 0,
    "send_images": True,
    "override_settings": {},
}
# Asked for, they would change the picture in a way this server cannot: refused.
_REFUSED_WHEN_SET = ("enable_hr", "restore_faces", "tiling", "script_name", "alwayson_scripts")


@dataclass(frozen=True)
class Limits:
    """What this server allows, and what it can run."""

    max_batch: int
    max_pixels: int
    samplers: Collection[str]
    schedulers: Collection[str]
    checkpoints: Sequence[Checkpoint]
    default_checkpoint: Checkpoint


@dataclass(frozen=True)
class Generation:
    """One A1111 call: `n_iter` jobs of `batch_size` images, seeds running on from `seed`."""

    kind: str  # "txt2img" or "img2img"
    prompt: str  # with A1111's <lora:...> tags taken out
    negative_prompt: str
    seed: int  # the first image's; the random one chosen for -1
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    n_iter: int
    sampler: str  # diffusiond's
    scheduler: str  # diffusiond's
    sampler_name: str  # as the client named it, for the infotexts
    scheduler_name: str
    loras: tuple[tuple[str, float], ...]
    clip_skip: int | None  # A1111's CLIP_stop_at_last_layers; None: the last layer
    checkpoint: Checkpoint
    edit: EditInputs | None
    send_images: bool
    parameters: dict[str, Any]  # the request as A1111 echoes it

    def seed_of(self, iteration: int) -> int:
        return (self.seed + iteration * self.batch_size) % (MAX_SEED + 1)

    @property
    def all_seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size * self.n_iter)]


def _refuse(field: str, rule: str, got: object) -> InvalidRequest:
    shown = repr(got) if not isinstance(got, str) or len(got) <= 40 else repr(got[:40] + "...")
    return InvalidRequest(f"{field} must be {rule}, got {shown}", field=field, rule=rule)


def _integer(field: str, low: int, high: int) -> Callable[[object], int]:
    rule = f"an integer from {low} to {high}"

    def check(value: object) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JavaScript clients send 512.0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _refuse(field, rule, value)
        return value

    return check


def _number(field: str, low: float, high: float) -> Callable[[object], float]:
    rule = f"a number from {low:g} to {high:g}"

    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(field, rule, value)
        if not math.isfinite(value) or not low <= value <= high:
            raise _refuse(field, rule, value)
        return float(value)

    return check


def _text(field: str) -> Callable[[object], str]:
    rule = f"a string of at most {MAX_TEXT_CHARS} characters"

    def check(value: object) -> str:
        if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
            raise _refuse(field, rule, value if not isinstance(value, str) else value[:40])
        return value

    return check


def _side(field: str) -> Callable[[object], int]:
    in_range = _integer(field, 64, 2048)

    def check(value: object) -> int:
        side = in_range(value)
        if side % 8:
            raise _refuse(field, "an integer from 64 to 2048, a multiple of 8", side)
        return side

    return check


def _seed(value: object) -> int:
    number = _integer("seed", -1, MAX_SEED)(value)
    return number if number >= 0 else secrets.randbelow(MAX_SEED + 1)


def _flag(field: str) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        raise _refuse(field, "true or false (or 0 or 1)", value)

    return check


def load_body(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def _value(data: dict[str, Any], field: str, check: Callable[[object], Any]) -> Any:
    raw = data.get(field)
    return check(DEFAULTS[field] if raw is None else raw)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for field in _REFUSED_WHEN_SET:
        if data.get(field):
            rule = "not set: this server does not support it"
            raise InvalidRequest(
                f"{field} is not supported here; leave it unset or empty", field=field, rule=rule
            )


def _overrides(data: dict[str, Any]) -> dict[str, Any]:
    overrides = data.get("override_settings")
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise _refuse("override_settings", "an object of setting names to values", overrides)
    return overrides


def _clip_skip(data: dict[str, Any]) -> int | None:
    raw = _overrides(data).get("CLIP_stop_at_last_layers")
    if raw is None:
        return None
    return _integer("override_settings.CLIP_stop_at_last_layers", 1, 12)(raw)


def _checkpoint(data: dict[str, Any], limits: Limits) -> Checkpoint:
    name = _overrides(data).get("sd_model_checkpoint")
    if name is None:
        return limits.default_checkpoint
    if not isinstance(name, str):
        raise _refuse("override_settings.sd_model_checkpoint", "a model title", name)
    return map_checkpoint(name, limits.checkpoints, "override_settings.sd_model_checkpoint")


def parse_generation(data: dict[str, Any], *, kind: str, limits: Limits) -> Generation:
    """The checked call of a txt2img (`kind` "txt2img") or img2img body."""
    _refuse_unsupported(data)
    prompt = _value(data, "prompt", _text("prompt"))
    clean_prompt, loras = split_lora_tags(prompt)
    width = _value(data, "width", _side("width"))
    height = _value(data, "height", _side("height"))
    if width * height > limits.max_pixels:
        rule = f"width x height of at most {limits.max_pixels} pixels"
        raise _refuse("width", rule, f"{width}x{height}")
    sampler_name = data.get("sampler_name") or data.get("sampler_index") or DEFAULTS["sampler_name"]
    scheduler_name = data.get("scheduler") or DEFAULTS["scheduler"]
    for field, value in (("sampler_name", sampler_name), ("scheduler", scheduler_name)):
        if not isinstance(value, str):
            raise _refuse(field, "a name from GET /sdapi/v1/samplers or /schedulers", value)
    sampler, scheduler = map_sampler(
        sampler_name, scheduler_name, samplers=limits.samplers, schedulers=limits.schedulers
    )
    checkpoint = _checkpoint(data, limits)
    edit = _edit_inputs(data, width, height, limits.max_pixels) if kind == "img2img" else None
    return Generation(
        kind=kind,
        prompt=clean_prompt,
        negative_prompt=_value(data, "negative_prompt", _text("negative_prompt")),
        seed=_value(data, "seed", _seed),
        steps=_value(data, "steps", _integer("steps", 1, 150)),
        cfg_scale=_value(data, "cfg_scale", _number("cfg_scale", 0, 30)),
        width=width,
        height=height,
        batch_size=_value(data, "batch_size", _integer("batch_size", 1, limits.max_batch)),
        n_iter=_value(data, "n_iter", _integer("n_iter", 1, MAX_N_ITER)),
        sampler=sampler,
        scheduler=scheduler,
        sampler_name=sampler_name,
        scheduler_name=scheduler_name,
        loras=loras,
        clip_skip=_clip_skip(data),
        checkpoint=checkpoint,
        edit=edit,
        send_images=_value(data, "send_images", _flag("send_images")),
        parameters=_echo(data, kind),
    )


def _echo(data: dict[str, Any], kind: str) -> dict[str, Any]:
    """The request with A1111's defaults filled in; without the input images, as A1111
    answers unless include_init_images is set."""
    echoed = {**{k: v for k, v in DEFAULTS.items() if k not in data or data[k] is None}, **data}
    if kind == "img2img" and not data.get("include_init_images"):
        echoed |= {"init_images": None, "mask": None}
    elif kind == "txt2img":
        for field in ("denoising_strength", "mask_blur", "inpainting_mask_invert", "resize_mode"):
            if field not in data:
                echoed.pop(field, None)
    return echoed


def _init_image(data: dict[str, Any], max_pixels: int) -> InputImage:
    images = data.get("init_images")
    rule = "a list of one base64 image (PNG, JPEG or WebP)"
    if not isinstance(images, list) or len(images) != 1:
        got = f"{len(images)} images" if isinstance(images, list) else images
        raise _refuse("init_images", rule, got)
    return read_input_image("init_images", images[0], max_pixels)


def _edit_inputs(data: dict[str, Any], width: int, height: int, max_pixels: int) -> EditInputs:
    init = _init_image(data, max_pixels)
    resize_mode = _value(data, "resize_mode", _integer("resize_mode", 0, 3))
    if resize_mode != 0 and (init.width, init.height) != (width, height):
        rule = "0 (just resize); 1 to 3 only when the init image is already width x height"
        raise _refuse("resize_mode", rule, resize_mode)
    strength = _value(data, "denoising_strength", _number("denoising_strength", 0, 1))
    if data.get("mask") is None:
        return EditInputs(init=init, strength=strength)
    mask = read_input_image("mask", data["mask"], max_pixels)
    if (mask.width, mask.height) != (init.width, init.height):
        rule = "an image of the init image's size"
        raise _refuse("mask", rule, f"{mask.width}x{mask.height}")
    if _value(data, "inpainting_mask_invert", _flag("inpainting_mask_invert")):
        mask = inverted_mask(mask)
    blur = _value(data, "mask_blur", _integer("mask_blur", 0, MAX_MASK_BLUR))
    return EditInputs(init=init, strength=strength, mask=mask, mask_blur=blur)


def inverted_mask(mask: InputImage) -> InputImage:
    """The mask with redrawn and kept swapped (A1111's inpainting_mask_invert), as a
    greyscale PNG: its alpha where it has transparency, else its brightness, inverted."""
    picture = read_image(mask.data, max_pixels=mask.width * mask.height, mode="RGBA")
    alpha = picture.getchannel("A")
    levels = alpha if alpha.getextrema() != (255, 255) else picture.convert("L")
    flipped = levels.point(lambda level: 255 - level)
    return InputImage(encode_png(flipped), mask.width, mask.height)
