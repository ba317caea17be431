"""A plugin backend for tests: the real diffusers backend with faults injected at its boundary.

Started with `diffusiond serve --backend tests.support.faulty_backend:create`. A prompt
containing `[fail-seed=N]` makes the image drawn with seed N raise a plain exception;
`[oom-seed=N]` raises PyTorch's out-of-memory error instead, `[path-seed=N]` an OSError
whose message holds a file path, `[die-seed=N]` SystemExit (which ends a worker thread),
and `[blank-seed=N]` returns a black picture after the real pipeline ran. Every other image
is drawn by the real pipeline. With DIFFUSIOND_TEST_LOAD_GATE=PATH set, loading waits until
PATH exists.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
from PIL import Image as PILImage
from PIL.Image import Image

from diffusiond.backends.base import (
    BackendInfo,
    CancelCheck,
    ImageSpec,
    PreviewCallback,
    StageCallback,
)
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.jobs.models import Stage
from diffusiond.settings import Settings

_FAULT = re.compile(r"\[(fail|oom|path|die|blank)-seed=(\d+)\]")


class InjectedFault(RuntimeError):
    pass


class FaultyBackend:
    def __init__(self, real: DiffusersBackend, load_gate: Path | None) -> None:
        self._real = real
        self._load_gate = load_gate

    def load(self) -> None:
        if self._load_gate is not None:
            while not self._load_gate.exists():  # a test opens the gate by creating the file
                time.sleep(0.05)
        self._real.load()

    def info(self) -> BackendInfo:
        return self._real.info()

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        if f"[blank-seed={spec.seed}]" in spec.prompt:
            drawn = self._real.generate(spec, on_stage, should_cancel, on_preview)
            return PILImage.new("RGB", drawn.size)
        fault = _fault_for(spec)
        if fault is None:
            return self._real.generate(spec, on_stage, should_cancel, on_preview)

        # Raised from inside the real pipeline, after its first diffusion step.
        def on_stage_then_fail(stage: Stage, step: int, total: int) -> None:
            on_stage(stage, step, total)
            if stage is Stage.DIFFUSION and step >= 1:
                raise fault

        return self._real.generate(spec, on_stage_then_fail, should_cancel)


def _fault_for(spec: ImageSpec) -> BaseException | None:
    faults: dict[str, BaseException] = {
        "fail": InjectedFault(f"injected fault at seed {spec.seed}"),
        "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "path": FileNotFoundError(2, "No such file", "/srv/secret/models/weights.bin"),
        "die": SystemExit("injected worker death"),
    }
    for kind, seed in _FAULT.findall(spec.prompt):
        if int(seed) == spec.seed and kind in faults:
            return faults[kind]
    return None


def create(settings: Settings) -> FaultyBackend:
    gate = os.environ.get("DIFFUSIOND_TEST_LOAD_GATE")
    real = DiffusersBackend(
        model_path=settings.model,
        home=settings.home,
        device=settings.device,
        torch_threads=settings.torch_threads,
    )
    return FaultyBackend(real, Path(gate) if gate else None)
