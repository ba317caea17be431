"""initImage, strength, maskImage, maskBlur: every rule, as a 400 naming field and rule."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from PIL import Image

from diffusiond.api.schemas import parse_generation_request
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.edit_json import edit_from_json, edit_to_json
from diffusiond.jobs.models import GenerationRequest
from tests.support.images import encoded, jpeg_rotated_by_exif, png_claiming


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(width: int = 96, height: int = 80, color: tuple[int, int, int] = (10, 20, 30)) -> str:
    return b64(encoded(Image.new("RGB", (width, height), color), "PNG"))


def parse(body: dict[str, Any], max_pixels: int = 1024 * 1024) -> GenerationRequest:
    return parse_generation_request(
        json.dumps({"prompt": "p", **body}).encode(), max_batch=4, max_pixels=max_pixels
    )


def refused(body: dict[str, Any], max_pixels: int = 1024 * 1024) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(body, max_pixels)
    return caught.value


def test_an_init_image_makes_an_img2img_request_with_its_size_and_default_strength() -> None:
    request = parse({"initImage": png(101, 83)})
    assert request.mode == "img2img"
    assert request.edit is not None
    assert request.edit.strength == 0.75
    assert (request.width, request.height) == (96, 80)  # rounded down to multiples of 8
    assert (request.edit.init.width, request.edit.init.height) == (101, 83)


def test_width_and_height_win_over_the_init_image_size() -> None:
    request = parse({"initImage": png(), "width": 128, "height": 64})
    assert (request.width, request.height) == (128, 64)
    assert parse({"initImage": png(96, 80), "width": 128}).height == 80


def test_a_large_init_image_is_scaled_into_the_pixel_budget() -> None:
    request = parse({"initImage": png(280, 140)}, max_pixels=100 * 100)
    assert request.width * request.height <= 100 * 100
    assert request.width % 8 == 0
    assert request.height % 8 == 0
    assert abs(request.width / request.height - 2) < 0.2  # the aspect is kept, near enough


def test_data_urls_and_wrapped_base64_are_read() -> None:
    raw = png()
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))
    for value in (f"data:image/png;base64,{raw}", f"DATA:image/webp;base64,{raw}", wrapped):
        assert parse({"initImage": value}).edit is not None


def test_an_inpaint_request_carries_its_mask_and_blur() -> None:
    request = parse({"initImage": png(), "maskImage": png(color=(255, 255, 255)), "maskBlur": 0})
    assert request.mode == "inpaint"
    assert request.edit is not None
    assert request.edit.mask_blur == 0


def test_the_exif_orientation_decides_the_size() -> None:
    request = parse({"initImage": b64(jpeg_rotated_by_exif(80, 64)), "maskImage": png(64, 80)})
    assert (request.width, request.height) == (64, 80)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"initImage": "not base64!"}, "initImage", "not valid base64"),
        ({"initImage": 12}, "initImage", "got int"),
        ({"initImage": "data:text/plain;base64,aGk="}, "initImage", "not an image type"),
        ({"initImage": "data:image/png,abc"}, "initImage", "not ;base64,"),
        ({"initImage": "data:image/png;base64"}, "initImage", "comma"),
        ({"initImage": b64(b"hello, not an image")}, "initImage", "not a readable image"),
        ({"initImage": b64(encoded(Image.new("RGB", (8, 8)), "GIF"))}, "initImage", "GIF"),
        ({"initImage": b64(png_claiming(50_000, 50_000))}, "initImage", "over the limit"),
        ({"maskImage": png()}, "maskImage", "only with initImage"),
        ({"strength": 0.5}, "strength", "only with initImage"),
        ({"maskBlur": 2}, "maskBlur", "only with initImage"),
        ({"initImage": png(), "maskBlur": 2}, "maskBlur", "only with maskImage"),
        ({"initImage": png(), "strength": 1.5}, "strength", "from 0 to 1"),
        ({"initImage": png(), "strength": "high"}, "strength", "from 0 to 1"),
        ({"initImage": png(), "strength": True}, "strength", "from 0 to 1"),
        ({"initImage": png(), "maskImage": png(), "maskBlur": 65}, "maskBlur", "0 to 64"),
        ({"initImage": png(), "maskImage": png(), "maskBlur": 1.5}, "maskBlur", "0 to 64"),
        ({"initImage": png(), "maskImage": png(64, 64)}, "maskImage", "same size"),
        ({"initImage": png(40, 200)}, "width", "outside 64 to 2048"),
    ],
)
def test_every_rule_is_a_400_naming_the_field(body: dict[str, Any], field: str, words: str) -> None:
    error = refused(body)
    assert error.field == field, error
    assert words in str(error)
    assert error.details["rule"]


def test_a_request_with_images_is_comparable_and_hashable_for_idempotency() -> None:
    body = {"initImage": png(), "maskImage": png(color=(255, 255, 255)), "strength": 0.4}
    first, again = parse(body), parse(body)
    assert first == again
    assert hash(first) == hash(again)
    assert first != parse({**body, "initImage": png(color=(9, 9, 9))})
    assert "data=" not in repr(first)  # a logged request never carries the image bytes


def test_edit_inputs_survive_their_json_form() -> None:
    edit = parse({"initImage": png(), "maskImage": png(), "maskBlur": 9}).edit
    assert edit is not None
    assert edit_from_json(json.loads(json.dumps(edit_to_json(edit)))) == edit
