from __future__ import annotations

import random

import pytest

from diffusiond.backends.base import DeviceOutOfMemory, GenerationCancelled
from diffusiond.engine.batch import (
    BatchFailed,
    classify_error,
    image_fraction,
    overall_percentage,
    resolve_seeds,
    run_batch,
    scrub_paths,
)
from diffusiond.jobs.models import ErrorCode, GenerationRequest, Progress, Stage
from tests.support.fakes import FakeBackend


def encode(image: object, _text: object) -> bytes:
    return repr(image).encode()


def test_given_seed_counts_up_and_wraps() -> None:
    assert resolve_seeds(7, 3) == [7, 8, 9]
    assert resolve_seeds(4294967294, 3) == [4294967294, 4294967295, 0]
    assert resolve_seeds(0, 1) == [0]


def test_no_seed_gives_an_own_random_seed_per_image() -> None:
    seeds = resolve_seeds(None, 5, random.Random(3))
    assert len(set(seeds)) == 5
    assert all(0 <= seed < 2**32 for seed in seeds)
    assert resolve_seeds(None, 5, random.Random(3)) == seeds


def test_stage_fractions_rise_through_an_image_and_stay_below_one() -> None:
    points = [image_fraction(Stage.LOADING, 0, 1), image_fraction(Stage.LOADING, 1, 1)]
    points += [image_fraction(Stage.DIFFUSION, step, 20) for step in range(21)]
    points += [image_fraction(Stage.DECODING, 0, 1), image_fraction(Stage.DECODING, 1, 1)]
    assert points == sorted(points)
    assert points[0] == 0.0
    assert points[-1] < 1.0


def test_overall_percentage_formula() -> None:
    assert overall_percentage(0, 1, 0.5) == 50.0
    assert overall_percentage(1, 3, 0.5) == 50.0
    assert overall_percentage(2, 4, 0.0) == 50.0
    assert overall_percentage(4, 5, 0.99) < 100


def run(
    backend: FakeBackend,
    request: GenerationRequest,
    cancel: bool = False,
) -> tuple[list[Progress], tuple[object, ...]]:
    reports: list[Progress] = []
    images, _timings = run_batch(
        backend, request, report=reports.append, should_cancel=lambda: cancel, encode=encode
    )
    return reports, images


def test_batch_draws_each_seed_and_reports_overall_progress() -> None:
    backend = FakeBackend()
    reports, images = run(backend, GenerationRequest(prompt="x", seed=41, count=3, steps=4))
    assert [spec.seed for spec in backend.drawn] == [41, 42, 43]
    assert [image.seed for image in images] == [41, 42, 43]  # type: ignore[attr-defined]
    percentages = [report.percentage for report in reports]
    assert percentages == sorted(percentages)
    assert max(percentages) < 100
    assert {report.total_images for report in reports} == {3}
    assert [report.current_image for report in reports] == sorted(
        report.current_image for report in reports
    )
    # Image 2 starts exactly where image 1 ended: one third of the job.
    first_of_two = next(r for r in reports if r.current_image == 2)
    assert first_of_two.percentage == pytest.approx(100 / 3, abs=0.01)
    diffusion = [r for r in reports if r.stage is Stage.DIFFUSION]
    assert all(r.total_steps == 4 for r in diffusion)


def test_a_failing_image_names_its_index_and_keeps_no_images() -> None:
    backend = FakeBackend(fail_on_seed=101)
    with pytest.raises(BatchFailed) as caught:
        run(backend, GenerationRequest(prompt="x", seed=100, count=3, steps=2))
    failure = caught.value
    assert (failure.index, failure.count) == (2, 3)
    error = failure.to_job_error()
    assert error.message == "Generation failed on image 2 of 3: the fake backend broke"
    assert error.code is ErrorCode.BACKEND_ERROR
    assert [spec.seed for spec in backend.drawn] == [100]


def test_a_single_image_failure_says_so_plainly() -> None:
    backend = FakeBackend(fail_on_seed=5, error=DeviceOutOfMemory("no room"))
    with pytest.raises(BatchFailed) as caught:
        run(backend, GenerationRequest(prompt="x", seed=5, steps=2))
    error = caught.value.to_job_error()
    assert error.message == "Generation failed: no room"
    assert error.code is ErrorCode.OUT_OF_MEMORY


def test_cancel_propagates_and_is_no_failure() -> None:
    backend = FakeBackend()
    with pytest.raises(GenerationCancelled):
        run(backend, GenerationRequest(prompt="x", seed=1, count=2), cancel=True)
    assert backend.drawn == []


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (DeviceOutOfMemory("x"), ErrorCode.OUT_OF_MEMORY),
        (MemoryError(), ErrorCode.OUT_OF_MEMORY),
        (TimeoutError(), ErrorCode.TIMEOUT_ERROR),
        (FileNotFoundError(), ErrorCode.IO_ERROR),
        (ValueError("x"), ErrorCode.BACKEND_ERROR),
        (KeyboardInterrupt(), ErrorCode.UNKNOWN_ERROR),
    ],
)
def test_error_codes(exc: BaseException, code: ErrorCode) -> None:
    assert classify_error(exc) is code


def test_a_blank_image_is_refused_not_returned() -> None:
    backend = FakeBackend(blank_on_seed=2)
    with pytest.raises(BatchFailed) as caught:
        run(backend, GenerationRequest(prompt="x", seed=1, count=2, steps=1))
    error = caught.value.to_job_error()
    assert error.message.startswith(
        "Generation failed on image 2 of 2: the model produced a blank image"
    )
    assert error.code is ErrorCode.BACKEND_ERROR


def test_file_paths_never_reach_the_stored_message() -> None:
    cause = FileNotFoundError(2, "No such file", "/home/alice/models/sd.safetensors")
    error = BatchFailed(1, 1, cause).to_job_error()
    assert "/home/alice" not in error.message
    assert "<path>" in error.message
    assert error.code is ErrorCode.IO_ERROR
    assert scrub_paths("see http://host/a/b and /var/lib/x") == "see http://host/a/b and <path>"
