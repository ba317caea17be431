"""The LoRA folder: which files are LoRAs, in which format, for which architecture.

Everything here reads only a safetensors file's header (its tensor names and shapes), never
the weights, and imports no torch: the API layer lists and checks LoRAs with it.

Formats: kohya/AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*`/`lora_te2_*`,
each pair `lora_down`/`lora_up` with an `.alpha`), and diffusers/peft (`unet.`,
`text_encoder.`, `text_encoder_2.`, a flow model's `transformer.` prefixes, `lora_A`/`lora_B`
or `lora.down`/`lora.up`). A flow family's LoRA (FLUX.1, SD 3.x, ...) is told by its module
names (flow_lora_files.py). Otherwise the architecture (sd1, sd2, sdxl:
BackendInfo.architecture's names) follows from the widths
the LoRA's down projections take in: SDXL's UNet cross-attention reads 2048-wide text
features and it has a second text encoder; SD 2.x's text encoder is 1024 wide; anything
else is sd1, as diffusers_backend.folder_architecture decides for a model.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusiond.backends.catalog import ModelCatalog
from diffusiond.backends.flow_lora_files import (
    FLOW_PREFIXES,
    flow_lora_architecture,
    format_fits,
    lora_fits,
)
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import LoraWeight

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a LoRA's header is kilobytes; beyond this: not one

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", *FLOW_PREFIXES)
SDXL_ONLY_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_DOWN = re.compile(r"(lora_down|lora_A|lora[._]down)\.weight$")
# The UNet's cross-attention key/value projections read the text encoder's features.
_CROSS_ATTENTION = re.compile(r"attn2[._](processor[._])?to_[kv]")
_TEXT_ATTENTION = re.compile(r"self_attn[._](to_)?[qkv](_proj|_lora)")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of the folder: `name` is the file's stem."""

    name: str
    path: Path
    format: str  # "kohya" or "peft"
    architecture: str  # sd1, sd2, sdxl, a flow family's name, or "unknown" where none tells
    size: int
    mtime_ns: int  # with `size`, tells a file changed on disk since it was read


def lora_folder(models_dir: Path | None, loras_dir: Path | None) -> Path | None:
    """The folder LoRAs are read from: --loras-dir, else MODELS_DIR/loras, else none."""
    if loras_dir is not None:
        return loras_dir
    return models_dir / "loras" if models_dir is not None else None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, from its header alone."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError("too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {length} bytes is not a safetensors header")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict):
            shapes[key] = tuple(int(size) for size in entry.get("shape", ()))
    return shapes


def lora_format(shapes: Shapes) -> str | None:
    """ "kohya", "peft", or None when the tensors are not a LoRA's."""
    keys = list(shapes)
    if any(key.startswith(KOHYA_PREFIXES) and _DOWN.search(key) for key in keys):
        return "kohya"
    if any(key.startswith(PEFT_PREFIXES) and _DOWN.search(key) for key in keys):
        return "peft"
    return None


def _input_width(shapes: Shapes, layer: re.Pattern[str]) -> int | None:
    """How wide the input of the first matching layer's down projection is."""
    for key, shape in shapes.items():
        if len(shape) >= 2 and _DOWN.search(key) and layer.search(key):
            return shape[1]
    return None


def lora_architecture(shapes: Shapes) -> str:
    """A flow family's name, or sd1, sd2 or sdxl, from the layers present and their widths;
    "unknown" if none tells."""
    flow = flow_lora_architecture(shapes)
    if flow is not None:
        return flow
    if any(key.startswith(SDXL_ONLY_PREFIXES) for key in shapes):
        return "sdxl"
    cross = _input_width(shapes, _CROSS_ATTENTION)
    if cross == 2048:
        return "sdxl"
    text = _input_width(shapes, _TEXT_ATTENTION)
    if 1024 in (cross, text):
        return "sd2"
    return "unknown" if cross is None and text is None else "sd1"


class LoraCatalog:
    """The LoRA files of one folder, read again when asked for a name it does not know.

    A file's header is read once per (size, mtime): a rescan of an unchanged folder only
    lists it. Files that are not LoRAs (or not readable) are left out, with one warning.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._known: dict[Path, LoraFile | None] = {}
        self._entries: dict[str, LoraFile] = {}

    def entries(self) -> tuple[LoraFile, ...]:
        """Every LoRA of the folder as it is now, by name."""
        with self._lock:
            self._scan()
            return tuple(self._entries[name] for name in sorted(self._entries))

    def find(self, name: str) -> LoraFile | None:
        """The LoRA called `name`; the folder is read again before answering None."""
        with self._lock:
            found = self._entries.get(name)
            if found is None or not _unchanged(found):
                self._scan()
                found = self._entries.get(name)
            return found

    def _scan(self) -> None:
        folder = self.folder
        paths = []
        if folder is not None and folder.is_dir():
            paths = [p for p in folder.iterdir() if p.suffix.lower() == LORA_SUFFIX]
        entries: dict[str, LoraFile] = {}
        for path in sorted(paths):
            entry = self._read(path)
            if entry is not None:
                entries[entry.name] = entry
        self._entries = entries

    def _read(self, path: Path) -> LoraFile | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        known = self._known.get(path)
        if known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return known
        entry: LoraFile | None = None
        try:
            shapes = read_shapes(path)
            kind = lora_format(shapes)
            if kind is None:
                log.warning("%s holds no LoRA layers: left out of the LoRAs", path.name)
            else:
                entry = LoraFile(
                    path.stem,
                    path,
                    kind,
                    lora_architecture(shapes),
                    stat.st_size,
                    stat.st_mtime_ns,
                )
        except (OSError, ValueError) as exc:
            log.warning("%s is not a readable safetensors file (%s): left out", path.name, exc)
        self._known[path] = entry
        return entry


def _unchanged(entry: LoraFile) -> bool:
    try:
        stat = entry.path.stat()
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)


LORAS_RULE = "names of GET /v1/loras, each made for the model's architecture"


class LoraChoices:
    """What the API lists and checks a request's LoRAs against (api.ports.LoraPort).

    `model_architecture(model_id)` names the architecture of the model a request will run
    on (None: the default model); "unknown" (a model not loaded yet, a broker with no
    worker) skips the architecture check, and the backend checks it again before applying.
    """

    def __init__(
        self, catalog: LoraCatalog, model_architecture: Callable[[str | None], str]
    ) -> None:
        self._catalog = catalog
        self._model_architecture = model_architecture

    def listing(self) -> list[dict[str, str]]:
        return [
            {"name": entry.name, "architecture": entry.architecture}
            for entry in self._catalog.entries()
        ]

    def check(self, model: str | None, loras: Sequence[LoraWeight]) -> None:
        """Raise InvalidRequest naming `loras` for an unknown LoRA, one of another
        architecture than the model's (flow_lora_files.lora_fits), or one in layer names
        the model's diffusers loader does not read (format_fits)."""
        if not loras:
            return
        architecture: str | None = None
        for lora in loras:
            entry = self._catalog.find(lora.name)
            if entry is None:
                names = ", ".join(e.name for e in self._catalog.entries()) or "none"
                raise InvalidRequest(
                    f"loras: there is no LoRA named {lora.name!r} (available: {names})",
                    field="loras",
                    rule=LORAS_RULE,
                )
            if architecture is None:
                architecture = self._model_architecture(model)
            if not lora_fits(entry.architecture, architecture):
                raise InvalidRequest(
                    f"loras: {lora.name!r} is a LoRA for {entry.architecture}, and the "
                    f"model is {architecture}",
                    field="loras",
                    rule=LORAS_RULE,
                )
            if not format_fits(entry.format, architecture):
                raise InvalidRequest(
                    f"loras: {lora.name!r} is in kohya's layer names, which diffusers' "
                    f"LoRA loader for {architecture} does not read (it takes diffusers' names)",
                    field="loras",
                    rule=LORAS_RULE,
                )


def lora_choices(
    models_dir: Path | None,
    loras_dir: Path | None,
    catalog: ModelCatalog | None,
    fallback_architecture: Callable[[], str],
) -> LoraChoices:
    """The LoRA folder's files, checked against the architecture of the model each request
    names: the catalog's, else (a plugin backend, a model the catalog cannot place)
    `fallback_architecture()`, what the running backend reports."""

    def architecture(model_id: str | None) -> str:
        entry = catalog.find(model_id) if catalog is not None else None
        if entry is not None and entry.architecture != "unknown":
            return entry.architecture
        return fallback_architecture() if model_id is None else "unknown"

    return LoraChoices(LoraCatalog(lora_folder(models_dir, loras_dir)), architecture)
