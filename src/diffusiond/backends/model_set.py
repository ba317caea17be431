"""Several models behind one backend: each image goes to the model its request names.

Loaded models are kept in a least-recently-used set of at most `max_loaded` (settings
`max_loaded_models`, IMAGE_MAX_LOADED_MODELS). A job for a model that is not loaded loads
it inside the job, reporting the `loading` stage meanwhile (so its time is the job's
`timings.loadingMs`), after unloading the least recently used model that no running job
holds, so that memory goes back to what it was before the other model came in (the
modules freed, a garbage collection, the heap trimmed). When every loaded model is in use
by a running job the load waits for one to be let go (checking the job's cancel meanwhile),
so the bound holds with several worker threads too.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from diffusiond.backends.base import (
    Backend,
    BackendInfo,
    CancelCheck,
    GenerationCancelled,
    ImageSpec,
    ModelLabel,
    PreviewCallback,
    StageCallback,
)
from diffusiond.backends.catalog import ModelCatalog, ModelEntry
from diffusiond.backends.model_hash import short_model_hash
from diffusiond.errors import ModelLoadError
from diffusiond.jobs.models import Stage
from diffusiond.memory import trim_heap

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

BackendBuilder = Callable[[ModelEntry], Backend]  # one model's backend, not loaded yet
Hasher = Callable[[ModelEntry], str | None]
_WAIT_SLICE_S = 0.25  # how often a load waiting for a free slot looks at its cancel


@dataclass
class _Slot:
    backend: Backend | None = None  # None while it loads
    users: int = 0


def hasher_in(home: Path, builtin_path: Callable[[], Path]) -> Hasher:
    """The short hash of an entry's weights, cached in `home` (model_hash.py)."""

    def hash_of(entry: ModelEntry) -> str | None:
        return short_model_hash(entry.path or builtin_path(), home)

    return hash_of


class ModelSet:
    """A `Backend` over a catalog: dispatches each spec to `spec.model` (None: the default)."""

    def __init__(
        self,
        catalog: ModelCatalog,
        build: BackendBuilder,
        *,
        max_loaded: int = 1,
        hash_of: Hasher = lambda _entry: None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self._catalog = catalog
        self._build = build
        self._max_loaded = max_loaded
        self._hash_of = hash_of
        self._changed = threading.Condition()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._hashes: dict[str, str | None] = {}
        self._architectures: dict[str, str] = {}  # as each model's backend reports it loaded
        self._default_info: BackendInfo | None = None
        self.last_switch_s: float | None = None  # the latest load's seconds, for benchmarks

    @property
    def catalog(self) -> ModelCatalog:
        return self._catalog

    # -- the Backend protocol ---------------------------------------------------------------

    def load(self) -> None:
        """Load the default model (at start-up, so the server is ready with it)."""
        backend = self._acquire(self._catalog.default_id, lambda: False)
        self._release(self._catalog.default_id)
        self._default_info = backend.info()

    def info(self) -> BackendInfo:
        with self._changed:
            loaded = tuple(i for i, slot in self._slots.items() if slot.backend is not None)
        default = self._default_info or BackendInfo("diffusers", self._catalog.default_id, "-", "-")
        return replace(default, models=loaded)

    def model_label(self, model: str | None) -> ModelLabel:
        model_id = self._catalog.default_id if model is None else model
        architecture = self._architectures.get(model_id, "unknown")
        return ModelLabel(model_id, self._hashes.get(model_id), architecture)

    def generate(
        self,
        spec: ImageSpec,
        on_stage: StageCallback,
        should_cancel: CancelCheck,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        model_id = self._catalog.default_id if spec.model is None else spec.model
        on_stage(Stage.LOADING, 0, 1)
        backend = self._acquire(model_id, should_cancel)
        try:
            if on_preview is None:
                return backend.generate(spec, on_stage, should_cancel)
            return backend.generate(spec, on_stage, should_cancel, on_preview)
        finally:
            self._release(model_id)

    # -- the LRU ------------------------------------------------------------------------------

    def loaded(self) -> tuple[str, ...]:
        """The loaded models' ids, the least recently used first."""
        return self.info().models

    def _acquire(self, model_id: str, should_cancel: CancelCheck) -> Backend:
        """The model's backend, held for one image; loaded first (evicting) if need be."""
        evicted: list[Backend] = []
        with self._changed:
            while True:
                slot = self._slots.get(model_id)
                if slot is not None and slot.backend is not None:
                    slot.users += 1
                    self._slots.move_to_end(model_id)
                    return slot.backend
                if slot is None and self._make_room(evicted):
                    self._slots[model_id] = _Slot(users=1)
                    break
                if should_cancel():
                    raise GenerationCancelled
                self._changed.wait(_WAIT_SLICE_S)  # another load, or every slot is in use
        try:
            self._unload(evicted)
            backend = self._load(model_id)
        except BaseException:
            with self._changed:
                del self._slots[model_id]
                self._changed.notify_all()
            raise
        with self._changed:
            self._slots[model_id].backend = backend
            self._changed.notify_all()
        return backend

    def _make_room(self, evicted: list[Backend]) -> bool:
        """Evict unused models (least recently used first) until one more fits; False when
        every slot is held by a running job or is loading. Called with the lock held."""
        while len(self._slots) >= self._max_loaded:
            victim = next(
                (i for i, s in self._slots.items() if s.users == 0 and s.backend is not None),
                None,
            )
            if victim is None:
                return False
            backend = self._slots.pop(victim).backend
            assert backend is not None
            evicted.append(backend)
            log.info("unloading model %s (least recently used)", victim)
        return True

    def _release(self, model_id: str) -> None:
        with self._changed:
            slot = self._slots.get(model_id)
            if slot is not None:
                slot.users -= 1
            self._changed.notify_all()

    @staticmethod
    def _unload(evicted: list[Backend]) -> None:
        """Drop the evicted backends (the last references: their modules go with them) and
        give the freed pages back to the OS. A full garbage collection costs ~1 s in a
        process holding torch and diffusers (measured: 0.75-1.2 s), and reference counting
        alone frees a pipeline, so it runs only where an evicted backend outlived its last
        reference (a cycle)."""
        if not evicted:
            return
        try:
            survivors = [weakref.ref(backend) for backend in evicted]
        except TypeError:  # a backend class without weak references: always collect
            survivors = []
        evicted.clear()
        if not survivors or any(ref() is not None for ref in survivors):
            gc.collect()
        trim_heap()

    def _load(self, model_id: str) -> Backend:
        entry = self._catalog.find(model_id)
        if entry is None:  # the API checks ids: this one left the models dir since
            raise ModelLoadError(f"model {model_id!r} is not in the models dir (any more)")
        started = time.monotonic()
        backend = self._build(entry)
        backend.load()
        if model_id not in self._hashes:
            self._hashes[model_id] = self._hash_of(entry)
        self._architectures[model_id] = backend.info().architecture
        self.last_switch_s = time.monotonic() - started
        log.info("model %s loaded in %.2f s", model_id, self.last_switch_s)
        return backend
