"""The run core (engine/run.py): progress, ETA, Retry-After, timeout and outcome, one layer
above a fake backend."""

from __future__ import annotations

import pytest

from diffusiond.engine.run import (
    Cancelled,
    Completed,
    Failed,
    JobRun,
    Pace,
    continue_progress,
    retry_after_s,
    work_units,
)
from diffusiond.jobs.models import ErrorCode, GenerationRequest, Preview, Progress, Stage
from tests.support.fakes import FakeBackend

REQUEST = GenerationRequest(prompt="x", width=64, height=64, steps=3, seed=1)


def _png(_image: object, _text: object) -> bytes:
    return b"png"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress(percentage: float, image: int = 1, preview: Preview | None = None) -> Progress:
    return Progress(Stage.DIFFUSION, 1, 10, percentage, image, 2, preview=preview)


def test_eta_uses_this_jobs_pace_then_the_history() -> None:
    pace = Pace()
    assert pace.eta_ms(0.0, 0.0, 1000) is None  # nothing to go by yet
    assert pace.eta_ms(50.0, 2000.0, 1000) == 2000  # half done in 2 s: 2 s left
    pace.learn(4000, 1000)  # 4 ms per unit of work
    assert pace.eta_ms(0.0, 0.0, 1000) == 4000
    # Early on the history weighs most; from 25 % the job's own pace alone.
    assert pace.eta_ms(10.0, 100.0, 1000) == round(0.4 * 900 + 0.6 * 3600)
    assert pace.eta_ms(50.0, 2000.0, 1000) == 2000
    pace.learn(1000, 1000)  # a faster job moves the history part of the way
    assert pace.eta_ms(0.0, 0.0, 1000) == round(0.7 * 4000 + 0.3 * 1000)


def test_progress_keeps_rising_and_keeps_the_images_preview() -> None:
    shot = Preview(b"jpeg", 8, 4, 1)
    first = continue_progress(None, _progress(30.0, preview=shot))
    assert first.preview == shot
    lower = continue_progress(first, _progress(20.0))
    assert lower.percentage == 30.0  # never falls
    assert lower.preview == shot  # carried forward within the image
    next_image = continue_progress(lower, _progress(55.0, image=2))
    assert next_image.percentage == 55.0
    assert next_image.preview is None  # another image: the old picture is not its preview


def test_a_report_reaches_the_sink_continued_and_with_its_eta() -> None:
    clock = FakeClock()
    sent: list[Progress] = []
    run = JobRun("j", REQUEST, pace=Pace(), on_progress=sent.append, clock=clock)
    run.mark_started()
    clock.now += 2.0
    run.report(_progress(50.0))
    run.report(_progress(40.0))
    assert [(p.percentage, p.eta_ms) for p in sent] == [(50.0, 2000), (50.0, 2000)]
    clock.now += 1.0  # no new report: the estimate as of now still moves
    now = run.progress_now()
    assert now is not None
    assert now.eta_ms == 3000
    assert run.eta_ms_now() == 3000


def test_retry_after_goes_by_the_soonest_known_end() -> None:
    assert retry_after_s([]) == 1
    assert retry_after_s([None, None]) == 1
    assert retry_after_s([None, 7_200.0, 12_000.0]) == 8
    assert retry_after_s([-500.0]) == 1  # overdue: try again soon, never 0
    assert retry_after_s([3_600_000.0]) == 60


def test_a_run_completes_and_teaches_the_pace() -> None:
    pace = Pace()
    run = JobRun("j", REQUEST, pace=pace)
    outcome = run.run(FakeBackend(), model="m", encode=_png)
    assert isinstance(outcome, Completed)
    assert [image.seed for image in outcome.result.images] == [1]
    assert outcome.result.timings is not None
    assert pace.eta_ms(0.0, 0.0, work_units(REQUEST)) is not None  # learned from it


def test_a_cancelled_run_says_so() -> None:
    run = JobRun("j", REQUEST, pace=Pace())
    run.cancel()
    assert run.should_stop() is True
    assert run.run(FakeBackend(), model="m", encode=_png) == Cancelled()


def test_a_failing_backend_is_a_failed_outcome() -> None:
    run = JobRun("j", REQUEST, pace=Pace())
    outcome = run.run(FakeBackend(fail_on_seed=1), model="m", encode=_png)
    assert isinstance(outcome, Failed)
    assert outcome.error.code is ErrorCode.BACKEND_ERROR
    assert outcome.error.message.startswith("Generation failed: ")


def test_past_the_time_limit_the_next_check_raises() -> None:
    clock = FakeClock()
    run = JobRun("j", REQUEST, pace=Pace(), timeout_ms=50, clock=clock)
    run.mark_started()
    clock.now += 0.04
    assert run.should_stop() is False
    clock.now += 0.02
    with pytest.raises(TimeoutError, match="timed out after 50 ms"):
        run.should_stop()


def test_the_recipe_names_the_model() -> None:
    recipes: list[object] = []

    def encode(_image: object, text: object) -> bytes:
        recipes.append(text)
        return b"png"

    JobRun("j", REQUEST, pace=Pace()).run(FakeBackend(), model="tiny-model", encode=encode)
    assert len(recipes) == 1
    assert "tiny-model" in str(recipes[0])
    assert '"architecture":"' + FakeBackend().info().architecture + '"' in str(recipes[0])
