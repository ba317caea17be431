"""The AUTOMATIC1111 front door in-process over the real Engine and registry with fake
backends: what a call becomes (its jobs' requests), its answer, skip, the wait limit, and
the pure parts (the body's rules, progress arithmetic, infotexts)."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import orjson
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from diffusiond.api.a1111.names import Checkpoint
from diffusiond.api.a1111.parse import Limits, inverted_mask, parse_generation
from diffusiond.api.a1111.routes import A1111Api, a1111_app, job_request
from diffusiond.api.a1111.shapes import Running, parse_infotext, progress_body
from diffusiond.api.edit_fields import read_input_image
from diffusiond.api.events import JobEvents
from diffusiond.api.openapi import openapi_document
from diffusiond.engine.engine import Engine
from diffusiond.errors import InvalidRequest, ServerBusy
from diffusiond.jobs.models import (
    SAMPLERS,
    SCHEDULERS,
    GenerationRequest,
    Job,
    JobStatus,
    LoraWeight,
    Progress,
    Stage,
)
from diffusiond.jobs.registry import GenerationRegistry
from diffusiond.testing.waits import eventually
from tests.support.fakes import FakeBackend, GatedBackend
from tests.support.inprocess import in_process_api

BUILTIN = Checkpoint("fake [0123456789]", "fake", "0123456789", "01" * 32, "fake", None)
OTHER = Checkpoint("other [abcdef0123]", "other", "abcdef0123", "ab" * 32, "other", "other")
LIMITS = Limits(
    max_batch=4,
    max_pixels=1024 * 1024,
    samplers=SAMPLERS,
    schedulers=SCHEDULERS,
    checkpoints=[BUILTIN, OTHER],
    default_checkpoint=BUILTIN,
)
SMALL = {"prompt": "a boat", "width": 64, "height": 64, "steps": 2}


def png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_call_becomes_one_job_per_iteration_with_the_seeds_running_on() -> None:
    body = {
        **SMALL,
        "prompt": "a boat <lora:film:0.5>",
        "seed": 10,
        "batch_size": 3,
        "n_iter": 2,
        "sampler_name": "DPM++ 2M",
        "override_settings": {"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 2},
    }
    generation = parse_generation(body, kind="txt2img", limits=LIMITS)
    first, second = (job_request(generation, iteration) for iteration in range(2))
    assert first == GenerationRequest(
        prompt="a boat",
        width=64,
        height=64,
        steps=2,
        cfg_scale=7.0,
        seed=10,
        sampler="dpm++2m",
        scheduler="karras",
        count=3,
        preview_every=1,
        model="other",
        loras=(LoraWeight("film", 0.5),),
        clip_skip=2,
    )
    assert second.seed == 13
    assert generation.all_seeds == [10, 11, 12, 13, 14, 15]
    assert generation.parameters["prompt"] == "a boat <lora:film:0.5>"
    assert generation.parameters["cfg_scale"] == 7.0  # A1111's default, filled in


def test_defaults_follow_a1111_and_the_default_model_is_none() -> None:
    generation = parse_generation({}, kind="txt2img", limits=LIMITS)
    request = job_request(generation, 0)
    assert (request.prompt, request.steps, request.width, request.sampler) == (
        "",
        50,
        512,
        "euler_a",
    )
    assert request.model is None
    assert 0 <= generation.seed < 2**32


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seed": -2}, "seed"),
        ({"steps": 151}, "steps"),
        ({"cfg_scale": "7"}, "cfg_scale"),
        ({"batch_size": 5}, "batch_size"),
        ({"n_iter": 0}, "n_iter"),
        ({"width": 2048, "height": 2048}, "width"),
        ({"height": 65}, "height"),
        ({"prompt": 3}, "prompt"),
        ({"tiling": True}, "tiling"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"ControlNet": {}}}, "alwayson_scripts"),
        ({"override_settings": []}, "override_settings"),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 13}},
            "override_settings.CLIP_stop_at_last_layers",
        ),
        ({"sampler_name": 3}, "sampler_name"),
        ({"send_images": "yes"}, "send_images"),
    ],
)
def test_each_rule_is_a_400_naming_the_a1111_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_generation({**SMALL, **body}, kind="txt2img", limits=LIMITS)
    assert refused.value.field == field


def test_img2img_needs_one_init_image_and_a_mask_of_its_size() -> None:
    init = png(Image.new("RGB", (64, 64), (9, 9, 9)))
    for images, field in (
        ([], "init_images"),
        ([init, init], "init_images"),
        (["x"], "init_images"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            parse_generation({**SMALL, "init_images": images}, kind="img2img", limits=LIMITS)
        assert refused.value.field == field
    small_mask = png(Image.new("L", (32, 32), 255))
    with pytest.raises(InvalidRequest) as refused:
        parse_generation(
            {**SMALL, "init_images": [init], "mask": small_mask}, kind="img2img", limits=LIMITS
        )
    assert refused.value.field == "mask"
    with pytest.raises(InvalidRequest) as refused:
        parse_generation(
            {**SMALL, "width": 128, "init_images": [init], "resize_mode": 1},
            kind="img2img",
            limits=LIMITS,
        )
    assert refused.value.field == "resize_mode"
    edit = parse_generation(
        {**SMALL, "init_images": [init], "denoising_strength": 0.4},
        kind="img2img",
        limits=LIMITS,
    ).edit
    assert edit is not None
    assert (edit.strength, edit.mask) == (0.4, None)


def test_an_inverted_mask_swaps_redrawn_and_kept() -> None:
    mask = Image.new("L", (16, 8), 0)
    mask.paste(255, (0, 0, 8, 8))
    flipped = inverted_mask(read_input_image("mask", png(mask), 1024))
    with Image.open(io.BytesIO(flipped.data)) as picture:
        assert (picture.getpixel((2, 2)), picture.getpixel((12, 2))) == (0, 255)
    clear = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    clear.paste((0, 0, 0, 255), (0, 0, 8, 8))  # opaque = redraw
    flipped = inverted_mask(read_input_image("mask", png(clear), 1024))
    with Image.open(io.BytesIO(flipped.data)) as picture:
        assert (picture.getpixel((2, 2)), picture.getpixel((12, 2))) == (0, 255)


def test_progress_counts_iterations_and_estimates_what_is_left() -> None:
    generation = parse_generation({**SMALL, "n_iter": 4}, kind="txt2img", limits=LIMITS)
    running = Running(generation, started_s=100.0, iteration=1, job_id="j")
    progress = Progress(Stage.DIFFUSION, 5, 10, 50.0, 1, 1)
    job = Job("j", job_request(generation, 1), JobStatus.IN_PROGRESS, 0, 0, progress=progress)
    body = progress_body(running, job, 106.0, skip_current_image=False)
    assert body["progress"] == pytest.approx(1.5 / 4)
    assert body["eta_relative"] == pytest.approx(6 / 0.375 - 6)
    assert body["state"] | {"job_timestamp": ""} == {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "j",
        "job_count": 4,
        "job_timestamp": "",
        "job_no": 1,
        "sampling_step": 5,
        "sampling_steps": 10,
    }
    assert body["current_image"] is None


def test_an_infotext_parses_into_its_settings() -> None:
    text = (
        'a cat, "quoted"\nsecond line\nNegative prompt: fog\n'
        'Steps: 20, Sampler: DPM++ 2M, Seed: 7, Size: 512x768, Lora hashes: "a: 1, b: 2"'
    )
    assert parse_infotext(text) == {
        "Prompt": 'a cat, "quoted"\nsecond line',
        "Negative prompt": "fog",
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Seed": "7",
        "Size": "512x768",
        "Lora hashes": "a: 1, b: 2",
        "Size-1": "512",
        "Size-2": "768",
    }
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_the_mounted_api_answers_through_the_ordinary_jobs() -> None:
    with in_process_api() as api:
        answer = api.client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 3, "batch_size": 2})
        assert answer.status_code == 200, answer.text
        info = orjson.loads(answer.json()["info"])
        assert info["all_seeds"] == [3, 4]
        assert len(answer.json()["images"]) == 2
        (job_id,) = info["job_ids"]
        assert api.registry.get(job_id).status is JobStatus.COMPLETE
        assert api.client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        refused = api.client.post("/sdapi/v1/txt2img", content=b"{not json")
        assert refused.status_code == 400
        assert set(refused.json()) >= {"error", "detail", "body", "errors"}
        wrong = api.client.get("/sdapi/v1/txt2img")
        assert wrong.status_code == 405
        assert "detail" in wrong.json()


class Deployed:
    def __init__(self, backend: FakeBackend, wait_limit_s: float) -> None:
        self.registry = GenerationRegistry(ttl_ms=60_000)
        self.engine = Engine(self.registry, backend, max_concurrent=1, max_queue=0)
        self.events = JobEvents()
        self.registry.add_listener(self.events.on_change)
        api = A1111Api(
            self.registry,
            self.engine,
            self.events,
            max_batch=4,
            max_pixels=1024 * 1024,
            max_body_bytes=1024 * 1024,
            wait_limit_s=wait_limit_s,
        )
        self.app: Starlette = a1111_app(api)


@contextmanager
def serving(wait_limit_s: float) -> Iterator[tuple[Deployed, GatedBackend, TestClient]]:
    backend = GatedBackend()
    deployed = Deployed(backend, wait_limit_s=wait_limit_s)
    deployed.engine.start()
    deployed.engine.load_model()
    try:
        with TestClient(deployed.app, base_url="http://localhost") as client:
            yield deployed, backend, client
            backend.open()
            deployed.events.close()
    finally:
        deployed.engine.shutdown()


@pytest.fixture
def gated() -> Iterator[tuple[Deployed, GatedBackend, TestClient]]:
    with serving(wait_limit_s=0.5) as running:
        yield running


def test_past_the_wait_limit_a_busy_server_is_a_503_with_retry_after(
    gated: tuple[Deployed, GatedBackend, TestClient],
) -> None:
    deployed, _backend, client = gated
    held = deployed.engine.submit(GenerationRequest(prompt="holds the worker", steps=5))
    started = time.monotonic()
    busy = client.post("/txt2img", json=SMALL)
    assert busy.status_code == 503
    assert time.monotonic() - started >= 0.5
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"] == "ServerBusy"
    assert "0.5 s" in busy.json()["detail"]
    deployed.engine.cancel(held.id)


def test_skip_drops_the_running_iteration_and_goes_on(
    gated: tuple[Deployed, GatedBackend, TestClient],
) -> None:
    deployed, backend, client = gated
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            client.post("/txt2img", json={**SMALL, "n_iter": 2, "seed": 5})
        )
    )
    thread.start()
    first = eventually(lambda: client.get("/progress").json()["state"]["job"])
    assert client.post("/skip").json() == {}
    backend.open()
    thread.join(timeout=30)
    (answer,) = answers
    info = orjson.loads(answer.json()["info"])
    assert info["job_ids"][0] == first
    assert len(info["job_ids"]) == 2
    assert deployed.registry.get(first).status is JobStatus.CANCELLED
    assert len(answer.json()["images"]) == 1
    assert info["infotexts"][0].count("Seed: 6") == 1  # the second iteration's image


def test_the_openapi_document_lists_every_a1111_route() -> None:
    app = Deployed(FakeBackend(), wait_limit_s=1).app
    mounted = {
        ("/sdapi/v1" + route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    paths = openapi_document(max_batch=4, secured=False)["paths"]
    documented = {
        (path, method)
        for path, item in paths.items()
        if path.startswith("/sdapi/")
        for method in item
    }
    assert documented == mounted


class RefusesOnce:
    """An engine that refuses its first submit with nothing running, as in the moment
    between a job's last change and its slot coming back: no job change will follow."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, request: GenerationRequest) -> Job:
        if not self.refused:
            self.refused += 1
            raise ServerBusy("the slot is not back yet", retry_after_s=1)
        return self._engine.submit(request)


def test_a_refusal_no_job_change_follows_is_tried_again_after_retry_after() -> None:
    registry = GenerationRegistry(ttl_ms=60_000)
    engine = Engine(registry, FakeBackend(), max_concurrent=1, max_queue=0)
    events = JobEvents()
    registry.add_listener(events.on_change)
    refusing = RefusesOnce(engine)
    api = A1111Api(
        registry,
        cast(Any, refusing),
        events,
        max_batch=4,
        max_pixels=1024 * 1024,
        max_body_bytes=1024 * 1024,
        wait_limit_s=30,
    )
    engine.start()
    engine.load_model()
    try:
        with TestClient(a1111_app(api), base_url="http://localhost") as client:
            started = time.monotonic()
            answer = client.post("/txt2img", json=SMALL)
            assert answer.status_code == 200, answer.text
            assert 1 <= time.monotonic() - started < 10
            assert refusing.refused == 1
            events.close()
    finally:
        engine.shutdown()


def test_interrupt_stops_a_call_still_waiting_for_a_worker() -> None:
    with serving(wait_limit_s=30) as (deployed, _backend, client):
        held = deployed.engine.submit(GenerationRequest(prompt="holds the worker", steps=5))
        answers: list[Any] = []
        thread = threading.Thread(
            target=lambda: answers.append(client.post("/txt2img", json=SMALL))
        )
        thread.start()
        eventually(lambda: client.get("/progress").json()["state"]["job_count"] == 1)
        assert client.post("/interrupt").json() == {}
        thread.join(timeout=10)
        (answer,) = answers
        assert answer.status_code == 200
        info = orjson.loads(answer.json()["info"])
        assert (answer.json()["images"], info["job_ids"], info["interrupted"]) == ([], [], True)
        assert deployed.registry.get(held.id).status is JobStatus.IN_PROGRESS  # not the API's
        deployed.engine.cancel(held.id)
