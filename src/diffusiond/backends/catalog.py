"""The model catalog: which models a server can draw with, and under which ids.

Every diffusers folder (it has a model_index.json) and every single-file checkpoint directly
in `--models-dir` is a model; its id is the folder's name or the file's stem. The built-in
model is always there as `builtin`. `--model` names the default: an id of the catalog, or a
path (a path outside the models dir becomes a model of its own, its id its name).

The catalog runs on API nodes too, which import no torch: it reads what it needs cheaply,
without loading any weights: a folder's model_index.json and text encoder config, a
.safetensors file's JSON header (the tensor names tell the architecture). A .ckpt is a
pickle, whose keys cannot be read without torch: its architecture is `unknown` here.

The directory may change while the server runs: `entries()` rescans it (GET /v1/models does,
and so does a look-up of an id not seen before), so a model copied in is usable at once and
a removed one is refused with the same 400 as any unknown id. A rescan re-reads only the
entries whose size or modification time changed.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from diffusiond.backends.components import (
    MANIFEST_NAME,
    ComponentFiles,
    detect_family,
    read_manifest,
    tensor_names,
)
from diffusiond.backends.families import family_for_pipeline
from diffusiond.errors import InvalidRequest, ModelLoadError

log = logging.getLogger(__name__)

BUILTIN_ID = "builtin"
LORAS_FOLDER = "loras"  # DIR/loras holds LoRA files, not a model
# The single-file formats a models dir may hold. Kept here, not imported from
# backends/single_file.py, because that module imports torch and the catalog runs on API
# nodes without it; tests/unit/test_catalog.py checks the two lists agree.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
FORMATS = ("builtin", "diffusers", "safetensors", "ckpt", "gguf", "components")
MAX_ID_CHARS = 200  # the API's rule for a model id (api/schemas.py MAX_NAME_CHARS)

_UNET_PREFIX = "model.diffusion_model."
_HEADER_LIMIT = 100_000_000


@dataclass(frozen=True)
class ModelEntry:
    """One model the server can draw with. `path` is None for the built-in model."""

    id: str
    format: str  # one of FORMATS
    architecture: str  # sd1, sd2, sdxl, a flow family's name (families.py), or unknown
    path: Path | None  # for components: the diffusion model's file
    components: ComponentFiles | None = None  # format "components" only


def architecture_from_keys(keys: frozenset[str]) -> str:
    """sd1, sd2 or sdxl from an ldm-layout checkpoint's tensor names; unknown otherwise."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if not has(_UNET_PREFIX):
        return "unknown"
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return "unknown"


def safetensors_keys(path: Path) -> frozenset[str]:
    """The tensor names of a .safetensors file, from its JSON header (no weights read)."""
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        if not 0 < size <= min(_HEADER_LIMIT, path.stat().st_size):
            raise ValueError(f"header length {size} is impossible for this file")
        header = json.loads(file.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return frozenset(key for key in header if key != "__metadata__")


def folder_entry_architecture(path: Path) -> str:
    """A diffusers folder's architecture from its model_index.json and text encoder config."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    class_name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    if class_name.startswith("StableDiffusionXL"):
        return "sdxl"
    family = family_for_pipeline(class_name)
    if family is not None:
        return family.name
    if not class_name.startswith("StableDiffusion"):
        return "unknown"
    try:
        text = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return "sd1"
    return "sd2" if isinstance(text, dict) and text.get("hidden_size") == 1024 else "sd1"


def describe(path: Path, model_id: str) -> ModelEntry | None:
    """The catalog entry for a folder or file, None when it is no model (logged why)."""
    if path.is_dir():
        return _describe_folder(path, model_id)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in MODEL_FILE_SUFFIXES:
        return None
    if suffix == ".gguf":
        return _describe_gguf(path, model_id)
    if suffix != ".safetensors":
        return ModelEntry(model_id, suffix[1:], "unknown", path)
    return _describe_safetensors(path, model_id)


def _describe_folder(path: Path, model_id: str) -> ModelEntry | None:
    if (path / "model_index.json").is_file():
        return ModelEntry(model_id, "diffusers", folder_entry_architecture(path), path)
    if (path / MANIFEST_NAME).is_file():
        return _describe_manifest(path, model_id)
    return None


def _describe_gguf(path: Path, model_id: str) -> ModelEntry:
    """A GGUF's architecture from its tensor names; unknown when they cannot be read (the
    loader then says why, naming the file)."""
    try:
        keys = tensor_names(path)
    except (OSError, ValueError):
        return ModelEntry(model_id, "gguf", "unknown", path)
    architecture = architecture_from_keys(keys)
    if architecture == "unknown":
        architecture = detect_family(keys) or "unknown"
    return ModelEntry(model_id, "gguf", architecture, path)


def components_entry(model_id: str, components: ComponentFiles) -> ModelEntry:
    """The entry of a model made of component files (a manifest's, or the flags')."""
    diffusion = components.files["diffusion_model"]
    return ModelEntry(model_id, "components", components.family, diffusion, components)


def _describe_manifest(path: Path, model_id: str) -> ModelEntry | None:
    try:
        components = read_manifest(path)
    except ModelLoadError as exc:
        log.warning("models dir: %s is skipped: %s", path.name, exc)
        return None
    return components_entry(model_id, components)


def _describe_safetensors(path: Path, model_id: str) -> ModelEntry | None:
    try:
        keys = safetensors_keys(path)
    except (OSError, ValueError) as exc:
        log.warning("models dir: %s is not a readable .safetensors file: %s", path.name, exc)
        return None
    family = detect_family(keys)
    if family is not None:  # a flow family's diffusion model, alone or with its other parts
        return ModelEntry(model_id, "safetensors", family, path)
    if not any(key.startswith(_UNET_PREFIX) for key in keys):
        log.info("models dir: %s has no UNet weights (a LoRA or a VAE?): skipped", path.name)
        return None
    return ModelEntry(model_id, "safetensors", architecture_from_keys(keys), path)


def _model_id(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


class ModelCatalog:
    """The models of one models dir, the built-in model and the default. Thread-safe."""

    def __init__(
        self,
        models_dir: Path | None,
        *,
        default: Path | None = None,
        default_components: ComponentFiles | None = None,
    ) -> None:
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan at a time: `_seen` is its cache
        self._seen: dict[Path, tuple[int, int, ModelEntry | None]] = {}
        self._entries: dict[str, ModelEntry] = {}
        self._extra: ModelEntry | None = None  # a default given as a path outside the dir
        self._scan()
        if default_components is not None:
            # --diffusion-model and its companions: a model of its own, named by that file
            diffusion = default_components.files["diffusion_model"]
            self._extra = components_entry(diffusion.stem[:MAX_ID_CHARS], default_components)
            self._scan()
            self.default_id = self._extra.id
        else:
            self.default_id = self._resolve_default(default)

    # -- what callers use -------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        """Every model, `builtin` first and the rest by id; the dir rescanned first."""
        self._scan()
        with self._lock:
            return list(self._entries.values())

    def find(self, model_id: str | None) -> ModelEntry | None:
        """The model `model_id` names (None: the default); the dir is rescanned on a miss."""
        wanted = self.default_id if model_id is None else model_id
        with self._lock:
            entry = self._entries.get(wanted)
        if entry is None or (entry.path is not None and not entry.path.exists()):
            self._scan()
            with self._lock:
                entry = self._entries.get(wanted)
        return entry

    def check(self, model_id: str | None) -> None:
        """An `InvalidRequest` naming `model` and the ids there are, unless it is one."""
        if self.find(model_id) is not None:
            return
        ids = [entry.id for entry in self.entries()]
        rule = "the id of a model of GET /v1/models"
        raise InvalidRequest(
            f"model must be {rule}; {model_id!r} is none of: {', '.join(ids)}",
            field="model",
            rule=rule,
        )

    # -- scanning ---------------------------------------------------------------------------

    def _scan(self) -> None:
        with self._scan_lock:
            self._scan_once()

    def _scan_once(self) -> None:
        found: dict[str, ModelEntry] = {BUILTIN_ID: ModelEntry(BUILTIN_ID, "builtin", "sd1", None)}
        for path in self._listing():
            entry = self._cached_describe(path)
            if entry is None:
                continue
            if entry.id in found:
                log.warning("models dir: %s is skipped: the id %r is taken", path.name, entry.id)
                continue
            found[entry.id] = entry
        if self._extra is not None:
            found[self._extra.id] = self._extra  # the default the user named wins
        with self._lock:
            self._entries = found

    def _listing(self) -> list[Path]:
        folder = self.models_dir
        if folder is None:
            return []
        try:
            children = sorted(folder.iterdir())
        except OSError as exc:
            log.warning("models dir %s cannot be read: %s", folder, exc)
            return []
        return [
            child
            for child in children
            if child.name != LORAS_FOLDER
            and not child.name.startswith(".")
            and 0 < len(_model_id(child)) <= MAX_ID_CHARS
        ]

    def _cached_describe(self, path: Path) -> ModelEntry | None:
        manifest = path / MANIFEST_NAME
        try:
            # a manifest edited in place changes no folder stamp: its own stamp counts
            stat = manifest.stat() if manifest.is_file() else path.stat()
        except OSError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        cached = self._seen.get(path)
        if cached is not None and cached[:2] == stamp:
            return cached[2]
        entry = describe(path, _model_id(path))
        self._seen[path] = (*stamp, entry)
        return entry

    def _resolve_default(self, default: Path | None) -> str:
        """The default's id: `builtin` when none is given, a catalog id, or a path's model."""
        if default is None:
            return BUILTIN_ID
        if default.exists():
            inside = self.models_dir is not None and _same(default.parent, self.models_dir)
            model_id = _model_id(default)
            if inside and model_id in self._entries:
                return model_id
            # Loadability is checked where the model loads; the catalog only names it.
            fmt = "diffusers" if default.is_dir() else default.suffix.lower().lstrip(".")
            entry = describe(default, model_id) or ModelEntry(model_id, fmt, "unknown", default)
            self._extra = entry
            self._scan()
            return model_id
        name = str(default)
        if name in self._entries:
            return name
        if len(default.parts) > 1:  # a path, not an id
            raise ModelLoadError(f"model path {default} does not exist")
        raise ModelLoadError(
            f"--model {name}: no model of the models dir has this id (ids: "
            f"{', '.join(self._entries)}), and as a path it does not exist"
        )


def _same(left: Path, right: Path) -> bool:
    try:
        return left.resolve() == right.resolve()
    except OSError:
        return False
