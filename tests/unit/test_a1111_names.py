"""The AUTOMATIC1111 name tables: samplers and schedulers, <lora:...> tags, checkpoints."""

from __future__ import annotations

import pytest

from diffusiond.api.a1111.names import (
    SAMPLER_TABLE,
    SCHEDULER_TABLE,
    Checkpoint,
    map_checkpoint,
    map_sampler,
    map_scheduler,
    samplers_available,
    split_lora_tags,
)
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import MAX_LORAS, SAMPLERS, SCHEDULERS


def sampler(name: str | None, scheduler: str | None = None) -> tuple[str, str]:
    return map_sampler(name, scheduler, samplers=SAMPLERS, schedulers=SCHEDULERS)


@pytest.mark.parametrize(
    ("name", "scheduler", "expected"),
    [
        ("Euler a", None, ("euler_a", "discrete")),
        ("euler A", "Automatic", ("euler_a", "discrete")),
        ("k_euler_ancestral", None, ("euler_a", "discrete")),
        ("Euler", "automatic", ("euler", "discrete")),
        ("DPM++ 2M", "Automatic", ("dpm++2m", "karras")),  # A1111 1.9+'s default for it
        ("DPM++ 2M", "Uniform", ("dpm++2m", "discrete")),
        ("DPM++ 2M Karras", None, ("dpm++2m", "karras")),  # the pre-1.9 name
        ("DPM++ 2M Karras", "Exponential", ("dpm++2m", "exponential")),  # explicit wins
        ("Euler a Exponential", None, ("euler_a", "exponential")),
        ("DPM++ 2S a", None, ("dpm++2s_a", "karras")),
        ("DPM2", None, ("dpm2", "karras")),
        ("Heun", "SGM Uniform", ("heun", "sgm_uniform")),
        ("DDIM", "simple", ("ddim", "simple")),
        ("UniPC", "Normal", ("unipc", "discrete")),
        ("LCM", None, ("lcm", "discrete")),
        (None, None, ("euler_a", "discrete")),
    ],
)
def test_a1111_samplers_map_to_sampler_and_schedule(
    name: str | None, scheduler: str | None, expected: tuple[str, str]
) -> None:
    assert sampler(name, scheduler) == expected


@pytest.mark.parametrize("name", ["DPM++ SDE", "LMS", "PLMS", "Restart", "Euler a Polyexp", ""])
def test_a_sampler_this_server_does_not_have_is_a_400_naming_sampler_name(name: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        sampler(name or "nothing")
    assert refused.value.field == "sampler_name"
    assert "Euler a" in refused.value.details["rule"]


def test_an_unknown_scheduler_is_a_400_naming_scheduler() -> None:
    with pytest.raises(InvalidRequest) as refused:
        sampler("Euler", "Align Your Steps")
    assert refused.value.field == "scheduler"
    assert "karras" in refused.value.details["rule"]


def test_only_samplers_the_server_runs_are_listed() -> None:
    names = [entry.name for entry in samplers_available(SAMPLERS)]
    assert names[:3] == ["DPM++ 2M", "DPM++ 2S a", "Euler a"]
    assert all(entry.sampler in SAMPLERS for entry in samplers_available(SAMPLERS))
    assert [entry.name for entry in samplers_available(["euler"])] == ["Euler"]
    with pytest.raises(InvalidRequest):
        map_sampler("Euler a", None, samplers=["euler"], schedulers=SCHEDULERS)


def test_a_default_schedule_the_server_lacks_falls_back_to_discrete() -> None:
    assert map_sampler("DPM++ 2M", None, samplers=SAMPLERS, schedulers=["discrete"]) == (
        "dpm++2m",
        "discrete",
    )


def test_every_table_entry_is_reachable_by_its_name_and_label() -> None:
    for entry in SAMPLER_TABLE:
        if entry.sampler in SAMPLERS:
            assert sampler(entry.name)[0] == entry.sampler
    for scheduler in SCHEDULER_TABLE:
        assert map_scheduler(scheduler.label, SCHEDULERS) == scheduler.scheduler
        assert map_scheduler(scheduler.name, SCHEDULERS) == scheduler.scheduler


@pytest.mark.parametrize(
    ("prompt", "clean", "loras"),
    [
        ("a cat", "a cat", ()),
        ("a cat <lora:film:0.6>", "a cat", (("film", 0.6),)),
        ("<lora:film:0.6>, a cat, night", "a cat, night", (("film", 0.6),)),
        ("a cat, <lora:film>, night", "a cat, night", (("film", 1.0),)),
        ("a <LORA:x:-1.5> cat <lora:y:2:te=1>", "a cat", (("x", -1.5), ("y", 2.0))),
        ("<lora:x:0.2> a <lora:x:0.9>", "a", (("x", 0.9),)),  # the last weight counts
        ("a,b  c", "a,b c", ()),
    ],
)
def test_lora_tags_are_taken_out_of_the_prompt(
    prompt: str, clean: str, loras: tuple[tuple[str, float], ...]
) -> None:
    assert split_lora_tags(prompt) == (clean, loras)


@pytest.mark.parametrize("tag", ["<lora:x:heavy>", "<lora:x:9>", "<lora: :1>", "<lora:x:nan>"])
def test_a_bad_lora_tag_is_a_400_naming_prompt(tag: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        split_lora_tags(f"a cat {tag}")
    assert refused.value.field == "prompt"
    assert "<lora:name:weight>" in refused.value.details["rule"]


def test_more_lora_tags_than_a_request_takes_are_refused() -> None:
    tags = " ".join(f"<lora:l{index}:1>" for index in range(MAX_LORAS + 1))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_LORAS}"):
        split_lora_tags(tags)


BUILTIN = Checkpoint("builtin [0123456789]", "builtin", "0123456789", "01" * 32, "builtin", None)
OTHER = Checkpoint(
    "sdxl-base.safetensors [abcdef0123]",
    "sdxl-base",
    "abcdef0123",
    "ab" * 32,
    "sdxl-base.safetensors",
    "sdxl",
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("builtin [0123456789]", BUILTIN),
        ("builtin", BUILTIN),
        ("sdxl-base.safetensors [abcdef0123]", OTHER),
        ("SDXL-base.safetensors", OTHER),
        ("sdxl-base", OTHER),
        ("sdxl", OTHER),  # the model id itself
    ],
)
def test_sd_model_checkpoint_names_a_model(name: str, expected: Checkpoint) -> None:
    assert map_checkpoint(name, [BUILTIN, OTHER]) == expected


def test_an_unknown_checkpoint_is_a_400_naming_the_field() -> None:
    with pytest.raises(InvalidRequest) as refused:
        map_checkpoint(
            "sd15 [ffffffffff]", [BUILTIN, OTHER], "override_settings.sd_model_checkpoint"
        )
    assert refused.value.field == "override_settings.sd_model_checkpoint"
