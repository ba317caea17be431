"""The OpenAI front door's pure parts: fields -> GenerationRequest, the quality -> steps map,
sizes, the multipart splitter, OpenAI's mask turned into diffusiond's, the answers checked
against the SDK's own types, and the error shapes; plus its routes in-process."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import openai.types as sdk_types
import pytest
from PIL import Image

from diffusiond.backends.base import BackendInfo
from diffusiond.compat.openai import answers
from diffusiond.compat.openai.errors import domain_error_parts, job_error_body
from diffusiond.compat.openai.models import served_model_id
from diffusiond.compat.openai.multipart import Form, parse_form
from diffusiond.compat.openai.params import AnswerOptions, auto_size, preview_every
from diffusiond.compat.openai.requests import parse_edit, parse_generation, redraw_mask
from diffusiond.errors import InvalidRequest, PayloadTooLarge, ServerBusy, StoreError
from diffusiond.jobs.models import (
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    Job,
    JobError,
    JobStatus,
    Preview,
    Result,
)
from tests.support.images import encoded, png_claiming
from tests.support.inprocess import in_process_api

BUDGET = 1024 * 1024


def generation(**fields: Any) -> GenerationRequest:
    return parse_generation({"prompt": "a boat", **fields}, max_batch=4, max_pixels=BUDGET).job


@pytest.mark.parametrize(
    ("quality", "steps"),
    [("low", 10), ("medium", 20), ("high", 30), ("auto", 20), ("standard", 20), ("hd", 30)],
)
def test_quality_maps_to_steps(quality: str, steps: int) -> None:
    assert generation(quality=quality).steps == steps


def test_fields_become_an_ordinary_request() -> None:
    job = generation(n=3, size="256x128", model="dall-e-3", user="u", style="vivid")
    assert (job.count, job.width, job.height, job.steps, job.preview_every) == (3, 256, 128, 20, 0)
    assert job.edit is None
    assert generation().width == 512  # size left out: auto


def test_auto_size_fits_the_pixel_budget() -> None:
    assert auto_size(BUDGET) == (512, 512)
    assert auto_size(128 * 128) == (128, 128)
    assert auto_size(100 * 100) == (96, 96)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "65x64"}, "size"),
        ({"size": "64X64"}, "size"),
        ({"size": "2048x2048"}, "size"),  # over the budget
        ({"size": 512}, "size"),
        ({"n": 5}, "n"),
        ({"n": True}, "n"),
        ({"n": "2"}, "n"),  # JSON: a number, not a string
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"model": 3}, "model"),
        ({"moderation": "high"}, "moderation"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x" * 10_001}, "prompt"),
    ],
)
def test_every_refusal_names_the_param(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        generation(**fields)
    assert refused.value.field == param
    assert param in refused.value.message


def test_previews_are_spread_so_the_partial_images_come_before_the_end() -> None:
    assert preview_every(20, 0) == 0
    assert preview_every(20, 2) == 6  # steps 6, 12 (and 18)
    assert preview_every(2, 3) == 1
    job = generation(stream=True, partial_images=3, quality="low")
    assert job.preview_every == 2
    assert generation(partial_images=3).preview_every == 0  # not streaming: no previews


def multipart(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> Any:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def png(picture: Image.Image) -> bytes:
    return encoded(picture, "PNG")


# Bytes that look like line ends and boundaries must come through untouched.
TRICKY = b"\r\n--\r\n\r\n\x00\xff--boundary\r\n" * 50


def test_the_form_splitter_keeps_binary_parts_exact() -> None:
    content_type, body = multipart(
        [("image[]", ("a.bin", TRICKY, "application/octet-stream")), ("mask", ("m", b"", "x/y"))],
        {"prompt": "é boat", "n": "2"},
    )
    form = parse_form(content_type, body)
    assert form.files == {"image[]": [TRICKY], "mask": [b""]}
    assert form.fields == {"prompt": "é boat", "n": "2"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{}"),
        ("multipart/form-data", b"--x\r\n\r\n--x--"),
        ("multipart/form-data; boundary=x", b"no parts at all"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Type: a/b\r\n\r\nv\r\n--x--"),
        ("multipart/form-data; boundary=x", b"--x\r\nno header end\r\n--x--"),
    ],
)
def test_a_malformed_form_is_a_400(content_type: str, body: bytes) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_form(content_type, body)
    assert refused.value.field == "Content-Type"


def edit_form(fields: dict[str, str], **files: bytes) -> Any:
    content_type, body = multipart(
        [(name, (f"{name}.png", data, "image/png")) for name, data in files.items()], fields
    )
    return parse_form(content_type, body)


NOISE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 128, 3), dtype=np.uint8))


def test_an_edit_becomes_inpainting_with_the_mask_inverted() -> None:
    mask = Image.new("RGBA", (128, 80), (9, 9, 9, 255))
    mask.paste((0, 0, 0, 0), (10, 10, 30, 20))
    form = edit_form(
        {"prompt": "a boat", "n": "2", "quality": "high"}, image=png(NOISE), mask=png(mask)
    )
    ask = parse_edit(form, max_batch=4, max_pixels=BUDGET)
    assert ask.events == "image_edit"
    job = ask.job
    assert (job.width, job.height, job.count, job.steps) == (128, 80, 2, 30)
    assert job.edit is not None
    assert job.edit.mask is not None
    assert job.edit.strength == 1.0
    levels = np.asarray(Image.open(io.BytesIO(job.edit.mask.data)))
    assert levels[15, 20] == 255  # transparent: redrawn
    assert levels[50, 100] == 0  # opaque: kept
    plain = parse_edit(edit_form({"prompt": "x"}, image=png(NOISE)), max_batch=4, max_pixels=BUDGET)
    assert plain.job.edit is not None
    assert (plain.job.edit.mask, plain.job.edit.strength) == (None, 0.75)


def test_the_mask_needs_transparency_and_goes_through_the_guarded_reader() -> None:
    with pytest.raises(InvalidRequest) as opaque:
        redraw_mask(png(NOISE), BUDGET)
    assert opaque.value.field == "mask"
    with pytest.raises(InvalidRequest) as bomb:
        redraw_mask(png_claiming(100_000, 100_000), BUDGET)
    assert bomb.value.field == "mask"
    assert "100000x100000" in bomb.value.message


def test_native_refusals_of_an_edit_name_the_openai_params() -> None:
    gif = encoded(NOISE, "GIF")
    with pytest.raises(InvalidRequest) as refused:
        parse_edit(edit_form({"prompt": "x"}, image=gif), max_batch=4, max_pixels=BUDGET)
    assert refused.value.field == "image"
    assert "initImage" not in refused.value.message
    assert "base64" not in refused.value.message
    small_mask = png(Image.new("RGBA", (64, 64)))
    form = edit_form({"prompt": "x"}, image=png(NOISE), mask=small_mask)
    with pytest.raises(InvalidRequest) as sized:
        parse_edit(form, max_batch=4, max_pixels=BUDGET)
    assert sized.value.field == "mask"
    with pytest.raises(InvalidRequest) as missing:
        parse_edit(Form(fields={"prompt": "x"}), max_batch=4, max_pixels=BUDGET)
    assert missing.value.field == "image"


def result(count: int = 2) -> Result:
    image = GeneratedImage(png(NOISE), seed=1, width=128, height=80)
    return Result(images=(image,) * count, time_taken_ms=5)


def test_the_images_response_matches_the_sdk_type() -> None:
    body = answers.images_body(result(), AnswerOptions(), 7, lambda index: f"http://h/{index}")
    parsed = sdk_types.ImagesResponse.model_validate(body)
    assert parsed.data is not None
    assert len(parsed.data) == 2
    assert parsed.data[0].b64_json is not None
    assert base64.b64decode(parsed.data[0].b64_json) == png(NOISE)
    urls = answers.images_body(result(), AnswerOptions(response_format="url"), 7, str)
    assert urls["data"] == [{"url": "0"}, {"url": "1"}]


def test_jpeg_and_webp_use_output_compression_as_their_quality() -> None:
    sizes = {}
    for quality in (90, 20):
        answer = AnswerOptions(output_format="webp", compression=quality)
        data = base64.b64decode(answers.image_b64(result().images[0], answer))
        assert Image.open(io.BytesIO(data)).format == "WEBP"
        sizes[quality] = len(data)
    assert sizes[20] < sizes[90]


def test_stream_events_match_the_sdk_types() -> None:
    preview = Preview(encoded(NOISE.resize((16, 10)), "JPEG"), 16, 10, step=3)
    answer = AnswerOptions(stream=True, partial_images=2, quality="hd")
    partial = answers.partial_event(
        "image_generation", preview, index=0, answer=answer, size="128x80", created=1
    )
    event = sdk_types.ImageGenPartialImageEvent.model_validate(partial)
    assert (event.partial_image_index, event.quality) == (0, "high")
    assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).format == "PNG"
    image = result().images[0]
    done = answers.completed_event("image_edit", image, answer, 1)
    assert sdk_types.ImageEditCompletedEvent.model_validate(done).size == "128x80"
    generated = answers.completed_event("image_generation", image, answer, 1)
    assert sdk_types.ImageGenCompletedEvent.model_validate(generated).usage.total_tokens == 0
    assert answers.sse("x", {"a": 1}) == b'event: x\ndata: {"a":1}\n\n'


def test_domain_errors_get_the_statuses_the_sdk_maps() -> None:
    status, body, headers = domain_error_parts(ServerBusy("full", retry_after_s=7))
    assert (status, headers) == (429, {"Retry-After": "7"})
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body, _ = domain_error_parts(InvalidRequest("n must be", field="n"))
    assert (status, body["error"]["param"]) == (400, "n")
    assert domain_error_parts(PayloadTooLarge("big"))[0] == 413
    status, body, _ = domain_error_parts(StoreError("disk /secret/path failed"))
    assert status == 503
    assert "/secret/path" not in str(body)


def test_a_job_that_did_not_complete_answers_500_or_409() -> None:
    job = Job("j1", GenerationRequest(prompt="x"), JobStatus.ERROR, 1, 1)
    failed = Job(**{**job.__dict__, "error": JobError("out of memory", ErrorCode.OUT_OF_MEMORY)})
    status, body = job_error_body(failed)
    assert status == 500
    assert body["error"]["code"] == "out_of_memory"
    cancelled = Job("j2", GenerationRequest(prompt="x"), JobStatus.CANCELLED, 1, 1)
    assert job_error_body(cancelled)[0] == 409


def test_the_served_model_is_listed_by_name_not_path() -> None:
    info = BackendInfo(name="diffusers", model="/models/sd15-pruned", device="cpu", dtype="f")
    assert served_model_id(info) == "sd15-pruned"


def test_the_routes_in_process_answer_in_openai_shape() -> None:
    with in_process_api() as api:
        http = api.client
        answer = http.post(
            "/openai/v1/images/generations",
            json={"prompt": "x", "size": "64x64", "quality": "low", "n": 2},
        )
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"]) == 2
        listed = http.get("/v1/images/generations").json()["generations"]
        assert [entry["status"] for entry in listed] == ["complete"]
        assert http.get("/openai/v1/models").json()["data"][0]["id"] == "fake"
        for response in (
            http.get("/openai/v1/nothing"),
            http.get("/openai/v1/images/generations"),
            http.post("/openai/v1/images/generations", content=b"{"),
        ):
            assert response.status_code in (400, 404, 405), response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
