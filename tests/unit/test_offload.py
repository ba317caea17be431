"""backends/offload.py: `--offload` chosen from free GPU memory, applied to a pipeline, and
reported by /health; on the CPU always none.

The glue is tested with a stand-in pipeline that records which of diffusers' methods was
called and a stand-in `torch.cuda.mem_get_info` (there is no GPU here): pure logic only.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from diffusiond.api.health import health_body
from diffusiond.backends.base import BackendInfo
from diffusiond.backends.offload import (
    GIB,
    WORKING_BASE_BYTES,
    WORKING_BYTES_PER_PIXEL,
    ModelBytes,
    Placement,
    apply_offload,
    choose_offload,
    pipeline_bytes,
    place_pipeline,
    resolve_offload,
    working_bytes,
)
from diffusiond.engine.engine import EngineStats
from diffusiond.errors import SettingsError
from diffusiond.settings import load_settings

WEIGHTS = ModelBytes(total=20 * GIB, largest=12 * GIB, largest_name="transformer")
WORKING = 4 * GIB


# -- the choice ------------------------------------------------------------------------------


def test_everything_fits_exactly_so_nothing_is_offloaded() -> None:
    assert choose_offload(24 * GIB, WEIGHTS, WORKING) == "none"


def test_one_byte_short_of_everything_offloads_module_by_module() -> None:
    assert choose_offload(24 * GIB - 1, WEIGHTS, WORKING) == "model"


def test_the_largest_module_fitting_exactly_is_model_offload() -> None:
    assert choose_offload(16 * GIB, WEIGHTS, WORKING) == "model"


def test_one_byte_short_of_the_largest_module_offloads_layer_by_layer() -> None:
    assert choose_offload(16 * GIB - 1, WEIGHTS, WORKING) == "sequential"
    assert choose_offload(0, WEIGHTS, WORKING) == "sequential"


def test_working_memory_grows_with_the_image() -> None:
    assert working_bytes(0) == WORKING_BASE_BYTES
    assert working_bytes(1024 * 1024) == WORKING_BASE_BYTES + 1024 * 1024 * WORKING_BYTES_PER_PIXEL
    assert working_bytes(1024 * 1024) == 4 * GIB
    assert working_bytes(2048 * 2048) > working_bytes(1024 * 1024)


def test_a_bigger_image_can_tip_the_choice() -> None:
    free = WEIGHTS.total + working_bytes(512 * 512)
    assert resolve_offload("auto", "cuda", WEIGHTS, 512 * 512, free).mode == "none"
    assert resolve_offload("auto", "cuda", WEIGHTS, 1024 * 1024, free).mode == "model"


@pytest.mark.parametrize("requested", ["auto", "none", "model", "sequential"])
def test_on_the_cpu_the_choice_is_always_none(requested: str) -> None:
    choice = resolve_offload(requested, "cpu", WEIGHTS, 1024 * 1024, None)
    assert choice.mode == "none"
    assert choice.free_bytes is None


@pytest.mark.parametrize("requested", ["model", "sequential"])
def test_an_offload_asked_for_on_the_cpu_is_logged_as_ignored(
    requested: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="diffusiond.backends.offload"):
        resolve_offload(requested, "cpu", WEIGHTS, 1024 * 1024, None)
    assert f"--offload {requested} ignored" in caplog.text


def test_auto_on_the_cpu_logs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diffusiond.backends.offload"):
        resolve_offload("auto", "cpu", WEIGHTS, 1024 * 1024, None)
    assert "ignored" not in caplog.text


@pytest.mark.parametrize(
    ("requested", "free", "expected"),
    [
        ("none", 1 * GIB, "none"),  # would be sequential under auto
        ("sequential", 100 * GIB, "sequential"),  # would be none under auto
        ("model", 100 * GIB, "model"),
        ("auto", 100 * GIB, "none"),
        ("auto", 1 * GIB, "sequential"),
    ],
)
def test_an_explicit_mode_wins_over_the_measurement_on_cuda(
    requested: str, free: int, expected: str
) -> None:
    assert resolve_offload(requested, "cuda:1", WEIGHTS, 1024 * 1024, free).mode == expected


# -- the setting -----------------------------------------------------------------------------


def test_the_setting_defaults_to_auto() -> None:
    assert load_settings({}, {}).offload == "auto"


def test_the_setting_is_read_from_the_environment_and_the_flag_wins() -> None:
    assert load_settings({"DIFFUSIOND_OFFLOAD": " Model "}, {}).offload == "model"
    both = load_settings({"DIFFUSIOND_OFFLOAD": "model"}, {"offload": "sequential"})
    assert both.offload == "sequential"


def test_a_bad_flag_value_is_refused_naming_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"--offload must be one of auto, none, model"):
        load_settings({}, {"offload": "cpu"})


def test_a_bad_variable_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"DIFFUSIOND_OFFLOAD must be one of .*'half'"):
        load_settings({"DIFFUSIOND_OFFLOAD": "half"}, {})


# -- the glue --------------------------------------------------------------------------------


class RecordingPipeline:
    """The part of a diffusers pipeline the glue touches, recording what it was told."""

    def __init__(self, components: dict[str, Any]) -> None:
        self.components = components
        self.calls: list[tuple[str, str]] = []

    def to(self, device: str) -> RecordingPipeline:
        self.calls.append(("to", device))
        return self

    def enable_model_cpu_offload(self, device: str) -> None:
        self.calls.append(("enable_model_cpu_offload", device))

    def enable_sequential_cpu_offload(self, device: str) -> None:
        self.calls.append(("enable_sequential_cpu_offload", device))


class FakeMemGetInfo:
    def __init__(self, free: int) -> None:
        self.free = free
        self.asked: list[Any] = []

    def __call__(self, device: Any) -> tuple[int, int]:
        self.asked.append(device)
        return self.free, 80 * GIB


def tiny_pipeline() -> RecordingPipeline:
    transformer = torch.nn.Linear(10, 20).to(torch.bfloat16)  # (200 + 20) x 2 bytes
    vae = torch.nn.BatchNorm1d(4)  # weight, bias (4 + 4) + buffers mean, var (4 + 4) x 4, + 8
    return RecordingPipeline(
        {"transformer": transformer, "vae": vae, "tokenizer": object(), "scheduler": None}
    )


TINY_TOTAL = 440 + 16 * 4 + 8  # the BatchNorm's num_batches_tracked is one int64


def test_the_weight_bytes_count_each_module_at_its_element_size() -> None:
    weights = pipeline_bytes(tiny_pipeline())
    assert weights == ModelBytes(TINY_TOTAL, 440, "transformer")


def test_a_pipeline_without_modules_weighs_nothing() -> None:
    assert pipeline_bytes(RecordingPipeline({"tokenizer": object()})) == ModelBytes(0, 0)


@pytest.mark.parametrize(
    ("free", "method"),
    [
        (TINY_TOTAL + working_bytes(64 * 64), "to"),
        (TINY_TOTAL + working_bytes(64 * 64) - 1, "enable_model_cpu_offload"),
        (440 + working_bytes(64 * 64) - 1, "enable_sequential_cpu_offload"),
    ],
)
def test_auto_on_cuda_measures_the_free_memory_and_calls_the_chosen_method(
    free: int, method: str
) -> None:
    pipeline = tiny_pipeline()
    mem_get_info = FakeMemGetInfo(free)
    choice = place_pipeline(pipeline, "cuda:0", "auto", 64 * 64, mem_get_info)
    assert pipeline.calls == [(method, "cuda:0")]
    assert mem_get_info.asked == ["cuda:0"]
    assert choice.free_bytes == free
    assert choice.weights.total == TINY_TOTAL


def test_on_the_cpu_the_pipeline_is_moved_and_no_gpu_is_asked() -> None:
    pipeline = tiny_pipeline()
    mem_get_info = FakeMemGetInfo(0)
    choice = place_pipeline(pipeline, "cpu", "sequential", 64 * 64, mem_get_info)
    assert pipeline.calls == [("to", "cpu")]
    assert mem_get_info.asked == []
    assert choice.mode == "none"


def test_the_choice_is_logged_once_with_its_numbers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="diffusiond.backends.offload"):
        place_pipeline(tiny_pipeline(), "cuda", "auto", 1024 * 1024, FakeMemGetInfo(2 * GIB))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("offload")]
    assert lines == [
        "offload sequential (requested auto): 2.00 GiB free on the GPU, weights 0.00 GiB, "
        "largest module transformer 0.00 GiB, working memory 4.00 GiB"
    ]


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown offload mode 'half'"):
        apply_offload(tiny_pipeline(), "half", "cuda")
    with pytest.raises(ValueError, match="offload 'half' is not one of auto, none"):
        Placement("half")


def test_the_placement_reports_none_until_loaded_then_the_choice() -> None:
    placement = Placement("model", 64 * 64, FakeMemGetInfo(80 * GIB))
    assert placement.mode == "none"
    pipeline = tiny_pipeline()
    placement.place(pipeline, "cuda")
    assert placement.mode == "model"
    assert pipeline.calls == [("enable_model_cpu_offload", "cuda")]


# -- /health ---------------------------------------------------------------------------------


class StubEngine:
    ready = True
    load_error = None
    max_queue = 0
    draining = False

    def stats(self) -> EngineStats:
        return EngineStats(running=0, admitted=0, max_concurrent=1)

    def info(self) -> BackendInfo:
        return BackendInfo("diffusers", "/m", "cuda", "float16", "flux1", offload="model")

    def health_extra(self) -> dict[str, object]:
        return {}


def test_health_reports_the_offload_with_the_key_only() -> None:
    engine: Any = StubEngine()
    full = health_body(engine, poll_interval_ms=500, max_batch=5, open_streams=0, full=True)
    assert full["offload"] == "model"
    short = health_body(engine, poll_interval_ms=500, max_batch=5, open_streams=0, full=False)
    assert "offload" not in short
    assert BackendInfo("n", "m", "cpu", "float32").offload == "none"


# -- the real diffusers methods --------------------------------------------------------------


def test_model_offload_through_real_hooks_draws_the_same_picture(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """diffusers' own enable_model_cpu_offload with the CPU as its execution device: the
    hooks are installed and move each module as it runs, and the picture is unchanged."""
    import warnings

    import diffusers
    import numpy as np

    from tests.support.families import tiny_family_folder

    folder = tiny_family_folder(tmp_path_factory.mktemp("offload"), "sd3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True
        )
    pipeline.set_progress_bar_config(disable=True)

    def draw() -> Any:
        generator = torch.Generator("cpu").manual_seed(7)
        call = {"num_inference_steps": 2, "width": 64, "height": 64, "output_type": "np"}
        return pipeline("a red cube", generator=generator, **call).images[0]

    before = draw()
    apply_offload(pipeline, "model", "cpu")
    assert hasattr(pipeline.transformer, "_hf_hook")
    assert len(pipeline._all_hooks) == len(torch_module_names(pipeline))
    np.testing.assert_array_equal(draw(), before)


def torch_module_names(pipeline: Any) -> list[str]:
    return [name for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)]
