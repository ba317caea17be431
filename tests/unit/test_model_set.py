"""The model set: each spec to its model, an LRU of loaded models, loads inside the job."""

from __future__ import annotations

import gc
import json
import threading
import weakref
from pathlib import Path

import pytest

from diffusiond.backends.base import Backend, GenerationCancelled, ImageSpec
from diffusiond.backends.catalog import ModelCatalog, ModelEntry
from diffusiond.backends.model_set import ModelSet
from diffusiond.jobs.models import Stage
from tests.support.fakes import FakeBackend


class Builds:
    """Builds a FakeBackend per model, remembering what was built and what is still alive."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.built: list[str] = []
        self.alive: dict[str, list[weakref.ref[FakeBackend]]] = {}
        self.fail = fail or set()
        self.events: list[str] = []

    def __call__(self, entry: ModelEntry) -> Backend:
        self.events.append(f"build {entry.id}")
        if entry.id in self.fail:
            raise RuntimeError(f"{entry.id} is broken")
        self.built.append(entry.id)
        backend = FakeBackend()
        self.alive.setdefault(entry.id, []).append(weakref.ref(backend))
        return backend

    def living(self) -> set[str]:
        gc.collect()
        return {i for i, refs in self.alive.items() if any(ref() is not None for ref in refs)}


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(
            json.dumps({"_class_name": "StableDiffusionPipeline"})
        )
    return ModelCatalog(tmp_path)


def spec(model: str | None) -> ImageSpec:
    return ImageSpec("p", "", 8, 8, 2, 7.0, 1, "euler", model=model)


def draw(models: ModelSet, model: str | None, stages: list[str] | None = None) -> None:
    seen = stages if stages is not None else []
    models.generate(spec(model), lambda stage, _s, _t: seen.append(stage.value), lambda: False)


def test_one_loaded_model_at_a_time_the_previous_one_freed(catalog: ModelCatalog) -> None:
    builds = Builds()
    models = ModelSet(catalog, builds, max_loaded=1)
    models.load()
    assert models.loaded() == ("builtin",)
    for model in ("alpha", "beta", "alpha", None):
        draw(models, model)
    assert builds.built == ["builtin", "alpha", "beta", "alpha", "builtin"]
    assert models.loaded() == ("builtin",)
    assert builds.living() == {"builtin"}  # every evicted backend was let go


def test_the_least_recently_used_goes_first_and_a_loaded_model_is_not_reloaded(
    catalog: ModelCatalog,
) -> None:
    builds = Builds()
    models = ModelSet(catalog, builds, max_loaded=2)
    models.load()
    draw(models, "alpha")
    draw(models, None)  # builtin is now the most recently used
    draw(models, "beta")  # evicts alpha
    assert models.loaded() == ("builtin", "beta")
    draw(models, None)
    assert builds.built == ["builtin", "alpha", "beta"]
    assert models.loaded() == ("beta", "builtin")


def test_a_load_is_reported_as_the_loading_stage_before_it_starts(
    catalog: ModelCatalog,
) -> None:
    builds = Builds()
    models = ModelSet(catalog, builds, max_loaded=1)

    def on_stage(stage: Stage, _step: int, _total: int) -> None:
        builds.events.append(f"stage {stage.value}")

    models.generate(spec("gamma"), on_stage, lambda: False)
    assert builds.events[:2] == ["stage loading", "build gamma"]


def test_a_failed_load_leaves_nothing_behind_and_the_next_try_loads_again(
    catalog: ModelCatalog,
) -> None:
    builds = Builds(fail={"alpha"})
    models = ModelSet(catalog, builds, max_loaded=1)
    models.load()
    with pytest.raises(RuntimeError, match="alpha is broken"):
        draw(models, "alpha")
    assert models.loaded() == ()  # builtin was evicted to make room, alpha never came
    builds.fail.clear()
    draw(models, "alpha")
    assert models.loaded() == ("alpha",)


def test_a_model_in_use_is_not_evicted_the_other_load_waits_and_can_be_cancelled(
    catalog: ModelCatalog,
) -> None:
    builds = Builds()
    models = ModelSet(catalog, builds, max_loaded=1)
    draw(models, "alpha")
    (alive,) = builds.alive["alpha"]
    holder = alive()
    assert holder is not None
    holder.holding = True
    first = threading.Thread(target=draw, args=(models, "alpha"))
    first.start()
    assert holder.at_step_one.wait(10)
    cancelled = threading.Event()
    outcome: list[str] = []

    def wait_for_beta() -> None:
        try:
            models.generate(spec("beta"), lambda *_: None, cancelled.is_set)
            outcome.append("drawn")
        except GenerationCancelled:
            outcome.append("cancelled")

    second = threading.Thread(target=wait_for_beta)
    second.start()
    cancelled.set()
    second.join(10)
    assert outcome == ["cancelled"]
    assert models.loaded() == ("alpha",)  # alpha is held: never unloaded under its job
    third = threading.Thread(target=draw, args=(models, "beta"))
    third.start()
    third.join(timeout=0.3)  # nothing to await: it must still be waiting after a while
    assert third.is_alive()
    assert "build beta" not in builds.events  # waits while alpha is in use
    holder.hold.set()
    first.join(10)
    third.join(10)
    assert models.loaded() == ("beta",)
    del holder, alive


def test_the_label_names_the_model_and_its_hash(catalog: ModelCatalog) -> None:
    models = ModelSet(catalog, Builds(), hash_of=lambda entry: f"h-{entry.id}")
    models.load()
    draw(models, "beta")
    assert models.model_label("beta").id == "beta"
    assert models.model_label("beta").hash == "h-beta"
    assert models.model_label(None).id == "builtin"
    assert models.model_label(None).hash == "h-builtin"
    assert models.info().models == ("beta",)


def test_a_job_on_the_model_set_names_each_image_s_model_and_hash_in_its_recipe(
    catalog: ModelCatalog,
) -> None:
    from diffusiond.engine.run import Completed, JobRun, Pace
    from diffusiond.imaging import read_recipe
    from diffusiond.jobs.models import GenerationRequest

    models = ModelSet(catalog, Builds(), hash_of=lambda entry: f"{entry.id:0<10}"[:10])
    models.load()
    for model, expected in ((None, "builtin"), ("beta", "beta")):
        request = GenerationRequest(prompt="p", width=8, height=8, steps=2, seed=1, model=model)
        outcome = JobRun("job", request, pace=Pace()).run(models, model="unused")
        assert isinstance(outcome, Completed)
        recipe = read_recipe(outcome.result.images[0].png)
        assert (recipe["model"], recipe["modelHash"]) == (expected, f"{expected:0<10}")
