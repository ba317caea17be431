"""LoRAs applied per request to a loaded pipeline, as peft adapters, with no leakage.

Why adapters and not fusing: fusing adds `weight x B·A` into the model's own weights and
unfusing subtracts it again, which in bfloat16 (and even float32) does not give back the
same bits, so a request without LoRAs after one with them would draw a different image.
An adapter leaves the model's weights untouched: its layers compute `base(x) + scale x
B(A(x))`, and with no adapter active a wrapped layer returns `base(x)` exactly. So:

- a LoRA is loaded once into the UNet (a flow model's transformer) and text encoder(s),
  by the pipeline's own `load_lora_weights`, as an adapter named `loraN`
  (peft names cannot hold a LoRA file's dots), and stays loaded (at most `max_resident`;
  the least recently used beyond that is deleted);
- each request activates exactly its adapters at its weights, layer by layer, or switches
  every adapter off when it asks for none; a weight of 0 is not applied at all;
- the file's tensors are kept in a bounded cache (`cache_bytes`), so loading an adapter
  again after an eviction does not read the file again.

Jobs that run at once share the modules, so one LoRA set is active at a time: a job
wanting another set waits until the running jobs are done with theirs (`applied`).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from diffusiond.backends.flow_lora_files import lora_fits
from diffusiond.backends.lora_files import LoraCatalog, LoraFile
from diffusiond.jobs.models import LoraWeight

log = logging.getLogger(__name__)

# A flow pipeline's LoRA goes into its `transformer` (and, for some, its text encoders).
ADAPTER_MODULES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024
DEFAULT_MAX_RESIDENT = 8  # MAX_LORAS: one request's LoRAs always fit

FileKey = tuple[str, int, int]  # path, size, mtime: a changed file is another LoRA
ActiveSet = tuple[tuple[str, float], ...]  # (adapter name, weight), in the request's order


class LoraLoadError(RuntimeError):
    """A LoRA of a request could not be applied; the message names it."""


def _file_key(entry: LoraFile) -> FileKey:
    return (str(entry.path), entry.size, entry.mtime_ns)


class LoraTensorCache:
    """The tensors of recently used LoRA files, least recently used out past `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.reads = 0  # files read from disk, for the tests and the benchmark
        self._entries: OrderedDict[FileKey, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def get(self, entry: LoraFile) -> dict[str, torch.Tensor]:
        key = _file_key(entry)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            return cached
        tensors: dict[str, torch.Tensor] = load_file(str(entry.path))
        self.reads += 1
        self._entries[key] = tensors
        self._bytes += _size(tensors)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= _size(dropped)
        return tensors


def _size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PipelineLoras:
    """The adapters of one loaded pipeline and which of them are active."""

    def __init__(
        self,
        pipeline: Any,
        catalog: LoraCatalog,
        *,
        architecture: Callable[[], str],
        after_load: Callable[[Any], None] | None = None,
        cache: LoraTensorCache | None = None,
        max_resident: int = DEFAULT_MAX_RESIDENT,
    ) -> None:
        self._pipeline = pipeline
        self._catalog = catalog
        self._architecture = architecture
        self._after_load = after_load
        self.cache = cache if cache is not None else LoraTensorCache()
        self._max_resident = max_resident
        self._resident: OrderedDict[FileKey, str] = OrderedDict()  # file -> adapter name
        self._next_adapter = 0
        self._active: ActiveSet = ()
        self._users = 0
        self._changed = threading.Condition()

    @contextmanager
    def applied(self, loras: Sequence[LoraWeight]) -> Iterator[None]:
        """The pipeline computes with exactly `loras` (none: with no adapter) inside."""
        with self._changed:
            wanted = self._resolve(loras)
            while self._users and self._active != wanted:
                self._changed.wait()
            if self._active != wanted:
                self._activate(wanted)
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()

    def _resolve(self, loras: Sequence[LoraWeight]) -> ActiveSet:
        """The adapters for `loras`, loaded where they are not yet (a weight of 0: left out).

        In the order of their names: the layers add the adapters' outputs in this order,
        and floating-point sums depend on it, so the request's order does not change the
        image."""
        wanted: list[tuple[str, float]] = []
        for lora in sorted(loras, key=lambda lora: lora.name):
            if lora.weight != 0:
                keep = {adapter for adapter, _ in wanted}
                wanted.append((self._adapter(lora.name, keep), lora.weight))
        return tuple(wanted)

    def _adapter(self, name: str, keep: set[str]) -> str:
        entry = self._catalog.find(name)
        if entry is None:
            raise LoraLoadError(f"there is no LoRA named {name!r} in the LoRA folder")
        architecture = self._architecture()
        if not lora_fits(entry.architecture, architecture):
            raise LoraLoadError(
                f"LoRA {name!r} is for {entry.architecture}, and the model is {architecture}"
            )
        key = _file_key(entry)
        adapter = self._resident.get(key)
        if adapter is not None:
            self._resident.move_to_end(key)
            return adapter
        return self._load(key, entry, keep)

    def _load(self, key: FileKey, entry: LoraFile, keep: set[str]) -> str:
        # Loading changes the modules: only while no job computes with them.
        while self._users:
            self._changed.wait()
        if key in self._resident:  # another job loaded it meanwhile
            return self._resident[key]
        self._evict(keep)
        adapter = f"lora{self._next_adapter}"
        self._next_adapter += 1
        try:
            tensors = self.cache.get(entry)
            # diffusers takes keys out of the dict it is given: a copy, the cache keeps its own.
            with warnings.catch_warnings():  # peft warns of a second adapter: that is the plan
                warnings.simplefilter("ignore", UserWarning)
                self._pipeline.load_lora_weights(dict(tensors), adapter_name=adapter)
            if not self._took(adapter):
                raise ValueError("none of its layers is one of this model's")
        except Exception as exc:
            self._discard(adapter)
            raise LoraLoadError(
                f"LoRA {entry.name!r} could not be applied to this model: {exc}"
            ) from exc
        finally:
            self._activate(self._active)  # loading changes which adapters are active
        self._resident[key] = adapter
        if self._after_load is not None:
            self._after_load(self._pipeline)
        log.info("LoRA %s loaded as adapter %s", entry.name, adapter)
        return adapter

    def _took(self, adapter: str) -> bool:
        """Whether a layer of the pipeline's modules holds `adapter` (diffusers loads the
        names it does not convert, SD 3's kohya ones, into nothing, and says nothing)."""
        if next(self._adapter_modules(), None) is None:
            return True  # a pipeline without modules to look in
        return any(adapter in layer.scaling for layer in self._tuner_layers())

    def _evict(self, keep: set[str]) -> None:
        """Room for one more adapter; `keep`: those the request being resolved uses. (No
        job runs now, so the active set may go: `applied` activates the new one.)"""
        while len(self._resident) >= self._max_resident:
            victim = next((k for k, a in self._resident.items() if a not in keep), None)
            if victim is None:
                return
            adapter = self._resident.pop(victim)
            self._discard(adapter)
            self._active = tuple(pair for pair in self._active if pair[0] != adapter)

    def _discard(self, adapter: str) -> None:
        """Take `adapter` out of every module that has it (a failed load leaves parts)."""
        for layer in self._tuner_layers():
            if adapter in getattr(layer, "scaling", {}):
                layer.delete_adapter(adapter)
        for module in self._adapter_modules():
            config = getattr(module, "peft_config", None)
            if isinstance(config, dict):
                config.pop(adapter, None)

    def _activate(self, wanted: ActiveSet) -> None:
        """Every adapter layer computes with exactly `wanted`'s adapters at their weights."""
        names = [adapter for adapter, _ in wanted]
        for layer in self._tuner_layers():
            if not names:
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            layer.set_adapter(names)
            for adapter, weight in wanted:
                layer.set_scale(adapter, weight)
        self._active = wanted

    def _tuner_layers(self) -> Iterator[Any]:
        """peft's adapter layers in the pipeline's modules (untyped: peft is not typed)."""
        for module in self._adapter_modules():
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    yield layer

    def _adapter_modules(self) -> Iterator[torch.nn.Module]:
        for name in ADAPTER_MODULES:
            module = getattr(self._pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                yield module
