"""PipelineLoras' bookkeeping over a pipeline stand-in that records what is loaded: the
caches, eviction, failures, and one LoRA set at a time. (The pixels are proven on the real
pipeline in tests/integration/test_loras.py.)"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from diffusiond.backends.lora_files import LoraCatalog
from diffusiond.backends.loras import LoraLoadError, LoraTensorCache, PipelineLoras
from diffusiond.jobs.models import LoraWeight
from tests.support import loras


class RecordingPipeline:
    """Has no modules; records each `load_lora_weights` and fails for the keys it is told."""

    def __init__(self, failing_key: str | None = None) -> None:
        self.loaded: list[tuple[str, int]] = []
        self._failing_key = failing_key

    def load_lora_weights(self, state: dict[str, Any], adapter_name: str) -> None:
        if self._failing_key is not None and any(self._failing_key in k for k in state):
            raise RuntimeError("size mismatch")
        self.loaded.append((adapter_name, len(state)))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    loras.kohya(tmp_path / "one.safetensors")
    loras.peft(tmp_path / "two.safetensors")
    loras.misfit(tmp_path / "misfit.safetensors")
    loras.sdxl_header_lora(tmp_path / "xl.safetensors")
    return tmp_path


def _loras(folder: Path, pipeline: RecordingPipeline, **options: Any) -> PipelineLoras:
    return PipelineLoras(pipeline, LoraCatalog(folder), architecture=lambda: "sd1", **options)


def test_a_lora_is_read_and_loaded_once_and_weight_zero_loads_nothing(folder: Path) -> None:
    pipeline = RecordingPipeline()
    applied = _loras(folder, pipeline)
    with applied.applied([LoraWeight("two", 0.0)]):
        pass
    assert pipeline.loaded == []
    for _ in range(3):
        with applied.applied([LoraWeight("one", 0.7)]):
            pass
        with applied.applied([]):
            pass
    assert [name for name, _ in pipeline.loaded] == ["lora0"]
    assert applied.cache.reads == 1


def test_evicted_adapters_are_built_again_from_the_tensor_cache(folder: Path) -> None:
    pipeline = RecordingPipeline()
    applied = _loras(folder, pipeline, max_resident=1)
    for name in ("one", "two", "one", "two"):
        with applied.applied([LoraWeight(name, 1.0)]):
            pass
    assert len(pipeline.loaded) == 4
    assert applied.cache.reads == 2


def test_the_tensor_cache_drops_the_least_recently_used(folder: Path) -> None:
    catalog = LoraCatalog(folder)
    one, two = catalog.find("one"), catalog.find("two")
    assert one is not None
    assert two is not None
    cache = LoraTensorCache(max_bytes=1)  # over at once: only the latest is kept
    cache.get(one)
    cache.get(two)
    cache.get(two)
    cache.get(one)
    assert cache.reads == 3


def test_a_failed_load_names_the_lora_and_changes_nothing(folder: Path) -> None:
    pipeline = RecordingPipeline(failing_key="lora_unet_down_blocks_2_attentions_0")
    applied = _loras(folder, pipeline)
    failing = applied.applied([LoraWeight("misfit", 1.0)])
    with pytest.raises(LoraLoadError, match="LoRA 'misfit' could not be applied"), failing:
        pytest.fail("must not run with a LoRA that failed")
    with applied.applied([LoraWeight("two", 1.0)]):
        pass
    assert [name for name, _ in pipeline.loaded] == ["lora1"]


@pytest.mark.parametrize(
    ("name", "says"),
    [("nowhere", "no LoRA named 'nowhere'"), ("xl", "'xl' is for sdxl, and the model is sd1")],
)
def test_an_unknown_or_foreign_lora_fails_before_loading(
    folder: Path, name: str, says: str
) -> None:
    pipeline = RecordingPipeline()
    refused = _loras(folder, pipeline).applied([LoraWeight(name, 1.0)])
    with pytest.raises(LoraLoadError, match=says), refused:
        pass
    assert pipeline.loaded == []


def test_a_job_wanting_another_set_waits_for_the_running_ones(folder: Path) -> None:
    applied = _loras(folder, RecordingPipeline())
    first_in = threading.Event()
    release_first = threading.Event()
    second_in = threading.Event()

    def first() -> None:
        with applied.applied([LoraWeight("one", 1.0)]):
            first_in.set()
            release_first.wait(10)

    def second() -> None:
        with applied.applied([]):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    assert not second_in.wait(0.3)  # still held by the first job's LoRA
    with applied.applied([LoraWeight("one", 1.0)]):  # the same set may run alongside
        pass
    release_first.set()
    assert second_in.wait(10)
    for thread in threads:
        thread.join(10)
