"""`generate --local` goes through the backend factory and the run core: --backend names
the backend, and a failure is the client's typed error, not a traceback."""

from __future__ import annotations

from typing import Any

import pytest

from diffusiond.client.errors import GenerationFailedError
from diffusiond.client.models import Progress
from diffusiond.local import generate_locally
from diffusiond.settings import Settings
from tests.support.fakes import FakeBackend

BUILT: list[FakeBackend] = []


def fake_backend(_settings: Settings) -> FakeBackend:
    BUILT.append(FakeBackend())
    return BUILT[-1]


def failing_backend(_settings: Settings) -> FakeBackend:
    return FakeBackend(fail_on_seed=5)


PARAMS: dict[str, Any] = {
    "prompt": "a test",
    "negative_prompt": None,
    "width": 64,
    "height": 64,
    "steps": 2,
    "cfg_scale": 7.5,
    "seed": 4,
    "sampler": "euler_a",
    "count": 2,
}


def test_the_named_backend_draws_the_images() -> None:
    seen: list[Progress] = []
    run_id, images = generate_locally(
        on_progress=seen.append, backend=f"{__name__}:fake_backend", **PARAMS
    )
    assert run_id.startswith("local_")
    assert [image.seed for image in images] == [4, 5]
    assert [spec.seed for spec in BUILT[-1].drawn] == [4, 5]  # this backend, not diffusers
    assert images[0].png.startswith(b"\x89PNG")
    percentages = [progress.percentage for progress in seen]
    assert percentages == sorted(percentages)
    assert seen[-1].eta_ms is not None


def test_a_failed_generation_is_a_typed_error() -> None:
    with pytest.raises(GenerationFailedError, match="on image 2 of 2") as caught:
        generate_locally(
            on_progress=lambda _p: None, backend=f"{__name__}:failing_backend", **PARAMS
        )
    assert caught.value.code == "BACKEND_ERROR"
