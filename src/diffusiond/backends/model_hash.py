"""A model's short hash, as AUTOMATIC1111 writes `Model hash`: the first 10 hex digits of
the SHA-256 of its weights file (a single-file checkpoint itself; for a diffusers folder,
its UNet's weights, the part that makes one model of an architecture differ from another).

Hashing a multi-gigabyte file takes seconds, so each result is kept in DIFFUSIOND_HOME,
keyed by the file's path, size and modification time: it is computed once per file version,
when the model first loads (inside a job's loading stage, never on an HTTP request's path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SHORT_HASH_DIGITS = 10
CACHE_FILE = "model-hashes.json"
_CHUNK = 4 * 1024 * 1024
# A diffusers folder's UNet weights, in the order diffusers itself prefers them.
_UNET_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_lock = threading.Lock()


def weights_file(model_path: Path) -> Path | None:
    """The file whose hash names the model; None when a folder has no UNet weights file."""
    if model_path.is_file():
        return model_path
    for name in _UNET_FILES:
        candidate = model_path / "unet" / name
        if candidate.is_file():
            return candidate
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def short_model_hash(model_path: Path, home: Path) -> str | None:
    """The model's 10-digit hash, from the cache in `home` where it is there; None when the
    model has no weights file to hash, or it cannot be read (logged)."""
    weights = weights_file(model_path)
    if weights is None:
        return None
    try:
        stat = weights.stat()
        key = f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        with _lock:
            cache = _read_cache(home)
            known = cache.get(key)
            if isinstance(known, str):
                return known
        short = file_sha256(weights)[:SHORT_HASH_DIGITS]
        with _lock:
            cache = _read_cache(home)
            cache[key] = short
            _write_cache(home, cache)
        return short
    except OSError as exc:
        log.warning("the hash of %s cannot be computed: %s", weights, exc)
        return None


def _read_cache(home: Path) -> dict[str, object]:
    try:
        loaded = json.loads((home / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_cache(home: Path, cache: dict[str, object]) -> None:
    """Written beside and renamed into place, so a reader never sees half a file."""
    home.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".model-hashes-", dir=home)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(cache, file, indent=0, sort_keys=True)
        os.replace(staging, home / CACHE_FILE)
    except OSError:
        Path(staging).unlink(missing_ok=True)
        raise
