"""Fakes one layer below the unit under test: a backend that draws tiny flat images."""

from __future__ import annotations

import threading
import time

from PIL import Image as PILImage
from PIL.Image import Image

from diffusiond.backends.base import (
    BackendInfo,
    CancelCheck,
    GenerationCancelled,
    ImageSpec,
    PreviewCallback,
    StageCallback,
)
from diffusiond.jobs.models import Stage


class FakeBackend:
    """Reports every stage like the real backend; can fail on a seed or hold at a step."""

    def __init__(
        self,
        *,
        fail_on_seed: int | None = None,
        error: BaseException | None = None,
        blank_on_seed: int | None = None,
        step_seconds: float = 0.0,
    ) -> None:
        self.step_seconds = step_seconds
        self.fail_on_seed = fail_on_seed
        self.blank_on_seed = blank_on_seed
        self.error = error or RuntimeError("the fake backend broke")
        self.drawn: list[ImageSpec] = []
        self.hold = threading.Event()  # while clear, generate() waits at step 1 (if holding)
        self.holding = False
        self.at_step_one = threading.Event()
        self.stopped_at: int | None = None

    def load(self) -> None:
        pass

    def info(self) -> BackendInfo:
        return BackendInfo(name="fake", model="fake", device="cpu", dtype="float32")

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        on_stage(Stage.LOADING, 0, 1)
        on_stage(Stage.LOADING, 1, 1)
        on_stage(Stage.DIFFUSION, 0, spec.steps)
        for step in range(1, spec.steps + 1):
            if spec.seed == self.fail_on_seed:
                raise self.error
            on_stage(Stage.DIFFUSION, step, spec.steps)
            if on_preview is not None and spec.preview_every and step % spec.preview_every == 0:
                on_preview(step, PILImage.new("RGB", (8, 4), (step % 256, 0, 0)))
            time.sleep(self.step_seconds)  # the simulated work of one step
            if step == 1 and self.holding:
                self.at_step_one.set()
                self.hold.wait(timeout=30)
            if should_cancel():
                self.stopped_at = step
                raise GenerationCancelled
        on_stage(Stage.DECODING, 0, 1)
        on_stage(Stage.DECODING, 1, 1)
        self.drawn.append(spec)
        picture = PILImage.new("RGB", (spec.width, spec.height), (spec.seed % 256, 0, 0))
        if spec.seed != self.blank_on_seed:
            picture.putpixel((0, 0), (255, 255, 255))  # not one flat colour
        return picture


class GatedBackend(FakeBackend):
    """A FakeBackend whose diffusion steps each wait for a permit: a test says how far a job
    may go (`allow(n)`, or `open()` for the rest), and waits for it with `steps_done`."""

    def __init__(self) -> None:
        super().__init__()
        self._permits = threading.Semaphore(0)
        self._opened = threading.Event()
        self._done_lock = threading.Lock()
        self.steps_done = 0

    def allow(self, steps: int) -> None:
        self._permits.release(steps)

    def open(self) -> None:
        self._opened.set()
        self._permits.release()  # wake the step that waits now; later ones do not wait

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        def gated(stage: Stage, step: int, total: int) -> None:
            if stage is Stage.DIFFUSION and step > 0 and not self._opened.is_set():
                self._permits.acquire(timeout=30)
            on_stage(stage, step, total)
            if stage is Stage.DIFFUSION and step > 0:
                with self._done_lock:
                    self.steps_done += 1

        return super().generate(spec, gated, should_cancel, on_preview)
