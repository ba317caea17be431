"""What the AUTOMATIC1111 API answers, in A1111's shapes: a generation's images and its
`info` string, `/progress`, `/png-info`, and the lists (models, samplers, schedulers)."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from diffusiond import __version__
from diffusiond.api.a1111.names import (
    SCHEDULER_TABLE,
    A1111Sampler,
    A1111Scheduler,
    Checkpoint,
)
from diffusiond.api.a1111.parse import Generation
from diffusiond.jobs.models import Job, JobStatus, Stage


@dataclass
class Running:
    """One A1111 call in flight: which of its `n_iter` jobs runs now, and what it was told."""

    generation: Generation
    started_s: float  # time.monotonic() when the call came in
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    iteration: int = 0
    job_id: str | None = None
    job_ids: list[str] = field(default_factory=list)
    finished: list[Job] = field(default_factory=list)  # complete jobs, in order
    interrupted: bool = False
    skipped: bool = False
    hung_up: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # hung up or interrupted

    def hang_up(self) -> None:
        self.hung_up = True
        self.stop.set()


def _schedule_label(scheduler: str) -> str:
    for entry in SCHEDULER_TABLE:
        if entry.scheduler == scheduler:
            return entry.label
    return scheduler


def infotext(generation: Generation, seed: int) -> str:
    """The `parameters` text A1111 writes for one image (prompt, negative, settings)."""
    prompt = generation.parameters.get("prompt") or ""
    settings = [
        f"Steps: {generation.steps}",
        f"Sampler: {generation.sampler_name}",
        f"Schedule type: {_schedule_label(generation.scheduler)}",
        f"CFG scale: {generation.cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {generation.width}x{generation.height}",
        f"Model hash: {generation.checkpoint.hash}",
        f"Model: {generation.checkpoint.model_name}",
    ]
    if generation.edit is not None:
        settings.append(f"Denoising strength: {generation.edit.strength:g}")
        if generation.edit.mask is not None:
            settings.append(f"Mask blur: {generation.edit.mask_blur}")
    settings.append(f"Version: diffusiond {__version__}")
    lines = [prompt]
    if generation.negative_prompt:
        lines.append(f"Negative prompt: {generation.negative_prompt}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def generation_body(running: Running) -> dict[str, Any]:
    """`{"images", "parameters", "info"}` of a finished call; `info` is a JSON string."""
    generation = running.generation
    images = [image for job in running.finished if job.result for image in job.result.images]
    count = generation.batch_size * generation.n_iter
    prompt = generation.parameters.get("prompt") or ""
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * count,
        "negative_prompt": generation.negative_prompt,
        "all_negative_prompts": [generation.negative_prompt] * count,
        "seed": generation.seed,
        "all_seeds": generation.all_seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": generation.width,
        "height": generation.height,
        "sampler_name": generation.sampler_name,
        "cfg_scale": generation.cfg_scale,
        "steps": generation.steps,
        "batch_size": generation.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": generation.checkpoint.model_name,
        "sd_model_hash": generation.checkpoint.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": generation.edit.strength if generation.edit else None,
        "extra_generation_params": {"Schedule type": _schedule_label(generation.scheduler)},
        "index_of_first_image": 0,
        "infotexts": [infotext(generation, image.seed) for image in images],
        "styles": [],
        "job_timestamp": running.timestamp,
        "clip_skip": generation.clip_skip or 1,
        "is_using_inpainting_conditioning": False,
        "version": f"diffusiond {__version__}",
        "interrupted": running.interrupted,
        "job_ids": running.job_ids,  # diffusiond's own: where each job is listed
    }
    shown = images if generation.send_images else []
    return {
        "images": [base64.b64encode(image.png).decode("ascii") for image in shown],
        "parameters": generation.parameters,
        "info": orjson.dumps(info).decode(),
    }


def idle_progress() -> dict[str, Any]:
    return {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": _state(None, None),
        "current_image": None,
        "textinfo": None,
    }


def _state(running: Running | None, job: Job | None) -> dict[str, Any]:
    progress = job.progress if job is not None else None
    diffusing = progress is not None and progress.stage is Stage.DIFFUSION
    return {
        "skipped": running.skipped if running else False,
        "interrupted": running.interrupted if running else False,
        "stopping_generation": False,
        "job": job.id if job is not None else "",
        "job_count": running.generation.n_iter if running else 0,
        "job_timestamp": running.timestamp if running else "0",
        "job_no": running.iteration if running else 0,
        "sampling_step": progress.current_step if progress and diffusing else 0,
        "sampling_steps": progress.total_steps if progress and diffusing else 0,
    }


def progress_body(
    running: Running, job: Job | None, now_s: float, *, skip_current_image: bool
) -> dict[str, Any]:
    """A1111's /progress for the call being followed: `progress` over all its jobs (0..1),
    `eta_relative` seconds left (A1111's estimate: time so far / progress, less time so far)."""
    generation = running.generation
    within = 0.0
    if job is not None and job.status is JobStatus.IN_PROGRESS and job.progress is not None:
        within = job.progress.percentage / 100
    elif job is not None and job.status.is_terminal():
        within = 1.0
    progress = min(1.0, (running.iteration + within) / generation.n_iter)
    elapsed = max(0.0, now_s - running.started_s)
    eta = elapsed / progress - elapsed if progress > 0 else 0.0
    preview = job.progress.preview if job is not None and job.progress is not None else None
    image = None
    if preview is not None and not skip_current_image:
        image = base64.b64encode(preview.jpeg).decode("ascii")
    text = None
    if job is not None:
        state = job.progress.stage.value if job.progress else job.status.value
        text = f"job {running.iteration + 1} of {generation.n_iter}: {state}"
    return {
        "progress": progress,
        "eta_relative": eta,
        "state": _state(running, job),
        "current_image": image,
        "textinfo": text,
    }


def sampler_body(entry: A1111Sampler) -> dict[str, Any]:
    options = (
        {"scheduler": entry.default_scheduler} if entry.default_scheduler != "discrete" else {}
    )
    return {"name": entry.name, "aliases": list(entry.aliases), "options": options}


def scheduler_body(entry: A1111Scheduler) -> dict[str, Any]:
    return {
        "name": entry.name,
        "label": entry.label,
        "aliases": None,
        "default_rho": -1,
        "need_inner_model": False,
    }


def checkpoint_body(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "title": checkpoint.title,
        "model_name": checkpoint.model_name,
        "hash": checkpoint.hash,
        "sha256": checkpoint.sha256,
        "filename": checkpoint.filename,
        "config": None,
    }


# "Key: value" pairs of an infotext's last line; a value may be quoted (and hold commas).
_SETTING = re.compile(r'\s*([^:,"]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """An A1111 `parameters` text as A1111's png-info answers it: Prompt, Negative prompt,
    then each setting of the last line as a string (Size also as Size-1 and Size-2)."""
    lines = text.strip().split("\n")
    settings: dict[str, Any] = {}
    if re.match(r"\s*Steps: ", lines[-1]):
        for key, value in _SETTING.findall(lines.pop()):
            text_value = str(orjson.loads(value)) if value.startswith('"') else value
            settings[key.strip()] = text_value.strip()
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if negative or line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt.append(line)
    if "Size" in settings:
        width, _, height = settings["Size"].partition("x")
        settings["Size-1"], settings["Size-2"] = width, height
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}
