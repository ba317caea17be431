"""`diffusiond generate --local`: the same generation in this process, with no server."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import orjson

from diffusiond.api.schemas import parse_generation_request
from diffusiond.backends.factory import make_backend
from diffusiond.backends.model_set import ModelSet
from diffusiond.client._protocol import GenerationParams
from diffusiond.client.errors import GenerationFailedError
from diffusiond.client.models import GeneratedImage, Progress
from diffusiond.engine.run import Completed, Failed, JobRun, Pace, load_backend, model_name
from diffusiond.jobs import models
from diffusiond.settings import load_settings


def generate_locally(
    *,
    prompt: str,
    on_progress: Callable[[Progress], object],
    backend: str | None = None,
    **params: Any,
) -> tuple[str, list[GeneratedImage]]:
    """Validate like the server, draw with the configured backend and model (the run core of
    diffusiond.engine.run, as a server would), return (run id, images).

    `params` are `Client.generate`'s keyword arguments. `backend` is --backend (a flag wins
    over DIFFUSIOND_BACKEND). Raises `GenerationFailedError` when the generation fails.
    """
    settings = load_settings(os.environ, {"backend": backend})
    body = GenerationParams(prompt=prompt, **params).to_wire()
    request = parse_generation_request(
        orjson.dumps(body), max_batch=settings.max_batch, max_pixels=settings.max_pixels
    )
    drawer = make_backend(settings)
    if isinstance(drawer, ModelSet):
        drawer.catalog.check(request.model)  # the server's 400, before anything loads
    model = model_name(load_backend(drawer))

    def report(progress: models.Progress) -> None:
        on_progress(
            Progress(
                progress.stage.value,
                progress.current_step,
                progress.total_steps,
                progress.percentage,
                progress.current_image,
                progress.total_images,
                progress.eta_ms,
            )
        )

    run_id = f"local_{time.time_ns() // 1_000_000}"
    run = JobRun(run_id, request, pace=Pace(), on_progress=report)
    outcome = run.run(drawer, model=model, preview_encoder=None)
    if isinstance(outcome, Failed):
        raise GenerationFailedError(outcome.error.message, code=outcome.error.code.value)
    assert isinstance(outcome, Completed)  # nothing cancels a local run
    return run_id, [GeneratedImage(i.png, i.seed, i.width, i.height) for i in outcome.result.images]
