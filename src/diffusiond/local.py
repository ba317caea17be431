"""`diffusiond generate --local`: the same generation in this process, with no server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import PurePath

import orjson

from diffusiond.api.schemas import parse_generation_request
from diffusiond.client.models import GeneratedImage, Progress
from diffusiond.engine.batch import image_recipe, run_batch
from diffusiond.imaging import encode_png
from diffusiond.jobs import models
from diffusiond.settings import load_settings


def generate_locally(
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    steps: int,
    cfg_scale: float,
    seed: int | None,
    sampler: str,
    count: int,
    on_progress: Callable[[Progress], object],
) -> tuple[str, list[GeneratedImage]]:
    """Validate like the server, draw with the configured model, return (run id, images)."""
    from diffusiond.backends.diffusers_backend import DiffusersBackend

    settings = load_settings(os.environ, {})
    body = {
        "prompt": prompt,
        "negativePrompt": negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "cfgScale": cfg_scale,
        "seed": seed,
        "sampler": sampler,
        "count": count,
    }
    request = parse_generation_request(orjson.dumps(body), max_batch=settings.max_batch)
    backend = DiffusersBackend(
        model_path=settings.model,
        home=settings.home,
        device=settings.device,
        torch_threads=settings.torch_threads,
        dtype=settings.dtype,
        model_config=settings.model_config,
    )
    backend.load()

    def report(progress: models.Progress) -> None:
        on_progress(
            Progress(
                progress.stage.value,
                progress.current_step,
                progress.total_steps,
                progress.percentage,
                progress.current_image,
                progress.total_images,
            )
        )

    model = PurePath(backend.info().model).name
    images, _timings = run_batch(
        backend,
        request,
        report=report,
        should_cancel=threading.Event().is_set,
        encode=encode_png,
        recipe=lambda spec: image_recipe(spec, model),
    )
    run_id = f"local_{time.time_ns() // 1_000_000}"
    return run_id, [GeneratedImage(i.png, i.seed, i.width, i.height) for i in images]
