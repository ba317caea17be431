"""The run core: the one place a job runs, whichever deployment runs it.

A `JobRun` owns one job's cancel token, its generation timeout, its progress (each report
kept rising, the image's last preview carried forward, `etaMs` from one formula), its stage
timings and its outcome (`Completed`, `Failed` or `Cancelled`). The in-process engine
(engine/engine.py) runs one on a worker thread and records the outcome in the registry;
the broker worker (broker/worker.py) runs one on a thread beside its event loop and returns
the outcome to SAQ. Neither repeats any of this.

Where broker mode differs, and why (the one place that says so):

- Progress reaches Redis from the worker's event loop, the latest report only, plus a
  heartbeat while a long step or a decode runs: every write is a network round trip, a slow
  Redis must not queue stale steps, and SAQ sweeps a worker whose heartbeat lapses. What is
  written is `JobRun.progress_now()`: the same clamp, preview and `etaMs` as in-process.
- The cancel token is set from the job's cancel mark in Redis (read at each write) or from
  SAQ's abort, since the DELETE reached another process.
- Each worker process learns the pace of its own earlier jobs (`Pace`). An API node runs no
  job, so it has no pace of its own: its `Retry-After` goes by the `etaMs` its workers last
  published for their running jobs, less the time since they published it. Both go through
  `retry_after_s`, so the two deployments round and bound the answer alike.
- The outcome crosses Redis as JSON (broker/mapping.py); a job function that breaks
  outright is SAQ's `failed` (UNKNOWN_ERROR), where the in-process engine records the same
  code itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePath

from diffusiond.backends.base import (
    Backend,
    BackendInfo,
    GenerationCancelled,
    ImageSpec,
    LabelsModels,
    ModelLabel,
)
from diffusiond.engine.batch import (
    BatchFailed,
    Encoder,
    PreviewEncoder,
    ProgressSink,
    image_recipe,
    run_batch,
)
from diffusiond.imaging import encode_png, encode_preview
from diffusiond.jobs.models import GenerationRequest, JobError, Progress, Result

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class GenerationTimedOut(TimeoutError):
    """The job ran past IMAGE_GENERATION_TIMEOUT_MS; raised at its next step."""


@dataclass(frozen=True)
class Completed:
    result: Result


@dataclass(frozen=True)
class Failed:
    error: JobError


@dataclass(frozen=True)
class Cancelled:
    """Stopped by its cancel token: whoever cancelled it has recorded that already."""


Outcome = Completed | Failed | Cancelled


def work_units(request: GenerationRequest) -> int:
    """How much a request asks for, to compare jobs' paces: pixels x steps x images."""
    return max(1, request.width * request.height * request.steps * request.count)


def load_backend(backend: Backend) -> BackendInfo:
    """Load the model (blocking) and log how long it took."""
    started = time.monotonic()
    backend.load()
    info = backend.info()
    log.info("model ready in %.1f s: %s", time.monotonic() - started, info)
    return info


def model_name(info: BackendInfo) -> str:
    """The model's name as the PNG recipe states it: its folder or file name, no path."""
    return PurePath(info.model).name


def retry_after_s(remaining_ms: Iterable[float | None]) -> int:
    """Seconds a refused client should wait: until the soonest running job should end,
    from each one's time left (None: unknown), bounded to 1..60; 1 with nothing to go by."""
    known = [ms for ms in remaining_ms if ms is not None]
    soonest_ms = min(known, default=1000.0)
    return min(60, max(1, math.ceil(soonest_ms / 1000)))


class Pace:
    """The pace of the jobs run so far, in ms per unit of work, and the time-left estimate
    built on it. Thread-safe; one per process that runs jobs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms_per_unit: float | None = None

    def learn(self, elapsed_ms: float, work: int) -> None:
        rate = elapsed_ms / work
        with self._lock:
            old = self._ms_per_unit
            self._ms_per_unit = rate if old is None else 0.7 * old + 0.3 * rate

    def eta_ms(self, percentage: float, elapsed_ms: float, work: int) -> int | None:
        """Time left: from this job's own pace, and from the pace of earlier jobs per unit of
        work while this one has too little progress to go by."""
        with self._lock:
            ms_per_unit = self._ms_per_unit
        left = (100 - percentage) / 100
        own = elapsed_ms * left / (percentage / 100) if percentage >= 1 else None
        past = ms_per_unit * work * left if ms_per_unit is not None else None
        if own is None:
            estimate = past
        elif past is None:
            estimate = own
        else:
            trust = min(1.0, percentage / 25)  # this job's own pace, fully from 25 %
            estimate = trust * own + (1 - trust) * past
        return None if estimate is None else max(0, round(estimate))


def continue_progress(previous: Progress | None, update: Progress) -> Progress:
    """`update` as the client sees it after `previous`: the percentage never falls, and the
    image's last preview stays until a newer one replaces it."""
    if previous is None:
        return update
    if update.percentage < previous.percentage:
        update = dataclasses.replace(update, percentage=previous.percentage)
    if (
        update.preview is None
        and previous.preview is not None
        and previous.current_image == update.current_image
    ):
        update = dataclasses.replace(update, preview=previous.preview)
    return update


def _ignore(_progress: Progress) -> None:
    pass


class JobRun:
    """One job from admission to its outcome. Made when the job is admitted (its cancel
    token works from then on); `run()` draws it on the calling thread."""

    def __init__(
        self,
        job_id: str,
        request: GenerationRequest,
        *,
        pace: Pace,
        timeout_ms: int = 0,
        on_progress: ProgressSink = _ignore,
        clock: Clock = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.request = request
        self._pace = pace
        self._timeout_ms = timeout_ms
        self._on_progress = on_progress
        self._clock = clock
        self._work = work_units(request)
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._latest: Progress | None = None
        self.started_at: float | None = None  # on `clock`, once `run()` began

    # -- the cancel token and the timeout ---------------------------------------------------

    def cancel(self) -> None:
        """Ask the generation to stop at its next step (idempotent, any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def should_stop(self) -> bool:
        """The backend's per-step check: True once cancelled; raises past the time limit."""
        if self._cancelled.is_set():
            return True
        if self._timeout_ms and self.elapsed_ms() > self._timeout_ms:
            raise GenerationTimedOut(
                f"timed out after {self._timeout_ms} ms (IMAGE_GENERATION_TIMEOUT_MS)"
            )
        return False

    def mark_started(self) -> None:
        """The job's clock starts (its timeout and pace count from here); idempotent."""
        if self.started_at is None:
            self.started_at = self._clock()

    # -- progress ---------------------------------------------------------------------------

    def elapsed_ms(self) -> float:
        return 0.0 if self.started_at is None else (self._clock() - self.started_at) * 1000

    def report(self, progress: Progress) -> None:
        """Take one report from the batch loop and hand it on, continued and with its ETA."""
        with self._lock:
            self._latest = continue_progress(self._latest, progress)
            latest = self._latest
        self._on_progress(self._with_eta(latest))

    def progress_now(self) -> Progress | None:
        """The latest progress with its ETA as of now; None before the first report."""
        with self._lock:
            latest = self._latest
        return None if latest is None else self._with_eta(latest)

    def eta_ms_now(self) -> int | None:
        progress = self.progress_now()
        return None if progress is None else progress.eta_ms

    def _with_eta(self, progress: Progress) -> Progress:
        eta = self._pace.eta_ms(progress.percentage, self.elapsed_ms(), self._work)
        return dataclasses.replace(progress, eta_ms=eta)

    # -- the run ----------------------------------------------------------------------------

    def run(
        self,
        backend: Backend,
        *,
        model: str,  # the recipe's model name for a backend that is not a model set
        encode: Encoder = encode_png,
        preview_encoder: PreviewEncoder | None = encode_preview,
    ) -> Outcome:
        """Draw the batch; the outcome, never an exception from the generation itself."""
        self.mark_started()

        architecture = backend.info().architecture

        def recipe(spec: ImageSpec) -> dict[str, str]:
            # A model set names the model the spec went to; a plugin backend draws one model.
            label = (
                backend.model_label(spec.model)
                if isinstance(backend, LabelsModels)
                else ModelLabel(model, architecture=architecture)
            )
            return image_recipe(spec, label.id, label.architecture, model_hash=label.hash)

        try:
            images, timings = run_batch(
                backend,
                self.request,
                report=self.report,
                should_cancel=self.should_stop,
                encode=encode,
                recipe=recipe,
                encode_preview=preview_encoder,
            )
        except GenerationCancelled:
            log.info(
                "job %s stopped after %.2f s: cancelled", self.job_id, self.elapsed_ms() / 1000
            )
            return Cancelled()
        except BatchFailed as failure:
            # The transition line says what the client sees; the cause's trace is for the log.
            log.warning("job %s failed: %r", self.job_id, failure.cause, exc_info=failure.cause)
            return Failed(failure.to_job_error())
        elapsed_ms = round(self.elapsed_ms())
        self._pace.learn(elapsed_ms, self._work)
        return Completed(Result(images, elapsed_ms, timings=timings))
