from __future__ import annotations

import json
from typing import Any

import pytest

from diffusiond.api.schemas import job_body, parse_generation_request, parse_list_query
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import (
    SAMPLERS,
    SCHEDULERS,
    GeneratedImage,
    GenerationRequest,
    Job,
    JobStatus,
    LoraWeight,
    Progress,
    Result,
    Stage,
)


def parse(body: Any, max_batch: int = 5) -> GenerationRequest:
    return parse_generation_request(json.dumps(body).encode(), max_batch=max_batch)


def test_defaults() -> None:
    assert parse({"prompt": "a cat"}) == GenerationRequest(
        prompt="a cat",
        negative_prompt="",
        width=512,
        height=512,
        steps=20,
        cfg_scale=7.5,
        seed=None,
        sampler="euler_a",
        count=1,
    )


def test_every_field_read_from_camel_case() -> None:
    request = parse(
        {
            "prompt": "p",
            "negativePrompt": "n",
            "width": 64,
            "height": 2048,
            "steps": 150,
            "cfgScale": 30,
            "seed": 4294967295,
            "sampler": "lcm",
            "count": 5,
        }
    )
    assert request == GenerationRequest("p", "n", 64, 2048, 150, 30.0, 4294967295, "lcm", 5)


def test_model_loras_scheduler_and_clip_skip() -> None:
    request = parse(
        {
            "prompt": "p",
            "model": "other",
            "loras": [{"name": "detail", "weight": -0.5}, {"name": "style"}],
            "scheduler": "sgm_uniform",
            "clipSkip": 2,
        }
    )
    assert request.model == "other"
    assert request.loras == (LoraWeight("detail", -0.5), LoraWeight("style", 1.0))
    assert (request.scheduler, request.clip_skip) == ("sgm_uniform", 2)
    assert parse({"prompt": "p"}).loras == ()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_is_accepted(scheduler: str) -> None:
    assert parse({"prompt": "p", "scheduler": scheduler}).scheduler == scheduler


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_is_accepted(sampler: str) -> None:
    assert parse({"prompt": "p", "sampler": sampler}).sampler == sampler


def test_minus_one_and_null_mean_random_seed() -> None:
    assert parse({"prompt": "p", "seed": -1}).seed is None
    assert parse({"prompt": "p", "seed": None}).seed is None


def test_cfg_scale_accepts_integers_and_edges() -> None:
    assert parse({"prompt": "p", "cfgScale": 0}).cfg_scale == 0.0
    assert parse({"prompt": "p", "cfgScale": 12.25}).cfg_scale == 12.25


@pytest.mark.parametrize(
    ("body", "field", "rule_words"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "\n\t "}, "prompt", "empty"),
        ({"prompt": ["a"]}, "prompt", "string"),
        ({"prompt": "x" * 10_001}, "prompt", "10000"),
        ({"prompt": "p", "negativePrompt": "n" * 10_001}, "negativePrompt", "10000"),
        ({"prompt": "p", "width": 2049}, "width", "2048"),
        ({"prompt": "p", "width": 2040 + 4}, "width", "multiple of 8"),
        ({"prompt": "p", "height": 56}, "height", "64"),
        ({"prompt": "p", "height": False}, "height", "integer"),
        ({"prompt": "p", "steps": 20.0}, "steps", "integer"),
        ({"prompt": "p", "steps": -1}, "steps", "150"),
        ({"prompt": "p", "cfgScale": True}, "cfgScale", "number"),
        ({"prompt": "p", "cfgScale": 31}, "cfgScale", "30"),
        ({"prompt": "p", "seed": "42"}, "seed", "integer"),
        ({"prompt": "p", "seed": 2**32}, "seed", "4294967295"),
        ({"prompt": "p", "sampler": "EULER_A"}, "sampler", "euler_a"),
        ({"prompt": "p", "count": 6}, "count", "1 to 5"),
        ({"prompt": "p", "count": 1.0}, "count", "integer"),
        ({"prompt": "p", "count": {"n": 1}}, "count", "integer"),
        ({"prompt": "p", "model": ""}, "model", "non-empty string"),
        ({"prompt": "p", "model": 3}, "model", "non-empty string"),
        ({"prompt": "p", "scheduler": "Karras"}, "scheduler", "karras"),
        ({"prompt": "p", "clipSkip": 13}, "clipSkip", "1 to 12"),
        ({"prompt": "p", "clipSkip": 0}, "clipSkip", "1 to 12"),
        ({"prompt": "p", "loras": {"name": "a"}}, "loras", "an array"),
        ({"prompt": "p", "loras": ["a"]}, "loras", "entry 0"),
        ({"prompt": "p", "loras": [{"name": "a", "weight": 5.5}]}, "loras", "-5 to 5"),
        ({"prompt": "p", "loras": [{"name": "a", "weight": True}]}, "loras", "weight true"),
        ({"prompt": "p", "loras": [{"name": "a"}, {"name": "a"}]}, "loras", "given twice"),
        ({"prompt": "p", "loras": [{"name": "a", "scale": 1}]}, "loras", "entry 0"),
        ({"prompt": "p", "loras": [{"name": str(i)} for i in range(9)]}, "loras", "9 entries"),
    ],
)
def test_rules_name_field_and_rule(body: Any, field: str, rule_words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert caught.value.field == field
    assert caught.value.message.startswith(field)
    assert rule_words in caught.value.message


def test_count_limit_follows_the_configured_maximum() -> None:
    assert parse({"prompt": "p", "count": 3}, max_batch=3).count == 3
    with pytest.raises(InvalidRequest, match="count must be an integer from 1 to 3"):
        parse({"prompt": "p", "count": 4}, max_batch=3)
    assert parse({"prompt": "p", "count": 8}, max_batch=8).count == 8


def test_missing_prompt() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse({"negativePrompt": "x"})
    assert caught.value.field == "prompt"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"3", b'"x"', b"null", b"{'a': 1}"])
def test_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_generation_request(raw, max_batch=5)


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "p", "cfgScale": NaN}', b'{"prompt": "p", "cfgScale": Infinity}']
)
def test_non_finite_numbers_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_generation_request(raw, max_batch=5)


def test_unknown_fields_are_ignored() -> None:
    assert parse({"prompt": "p", "extra": {"deep": [1]}}) == GenerationRequest(prompt="p")


def make_job(status: JobStatus, **changes: Any) -> Job:
    return Job(
        id="gen_1_a",
        request=GenerationRequest(prompt="p"),
        status=status,
        created_at=1,
        updated_at=2,
        **changes,
    )


def test_job_body_shapes() -> None:
    running = make_job(
        JobStatus.IN_PROGRESS, progress=Progress(Stage.DIFFUSION, 15, 30, 52.5, 2, 3)
    )
    assert job_body(running) == {
        "id": "gen_1_a",
        "status": "in_progress",
        "createdAt": 1,
        "updatedAt": 2,
        "progress": {
            "currentStep": 15,
            "totalSteps": 30,
            "stage": "diffusion",
            "percentage": 52.5,
            "currentImage": 2,
            "totalImages": 3,
        },
    }
    assert "progress" not in job_body(make_job(JobStatus.PENDING))
    done = make_job(
        JobStatus.COMPLETE,
        result=Result((GeneratedImage(png=b"\x89PNG", seed=42, width=64, height=64),), 5823),
    )
    assert job_body(done)["result"] == {
        "images": [{"image": "iVBORw==", "seed": 42, "width": 64, "height": 64}],
        "format": "png",
        "timeTaken": 5823,
    }


def test_list_query() -> None:
    assert parse_list_query([], []) == (None, None)
    statuses, limit = parse_list_query(["pending,in_progress", "error"], ["20"])
    assert statuses == frozenset({JobStatus.PENDING, JobStatus.IN_PROGRESS, JobStatus.ERROR})
    assert limit == 20


@pytest.mark.parametrize(
    ("statuses", "limits", "field"),
    [
        (["done"], [], "status"),
        (["pending,"], [], "status"),
        ([], ["0"], "limit"),
        ([], ["-1"], "limit"),
        ([], ["ten"], "limit"),
        ([], ["10001"], "limit"),
        ([], ["1", "2"], "limit"),
    ],
)
def test_list_query_rules_name_the_field(
    statuses: list[str], limits: list[str], field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_list_query(statuses, limits)
    assert caught.value.field == field
    assert field in caught.value.message
