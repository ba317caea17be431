"""A family's VAE and text encoders (with their tokenizers) from component files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusiond.errors import ModelLoadError


def load_vae(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    raise ModelLoadError(f"vae {path}: {family} from component files is not built yet")


def load_text_encoder(
    family: str, role: str, path: Path, dtype: torch.dtype, tokenizers: Path | None
) -> tuple[Any, Any]:
    raise ModelLoadError(f"{role} {path}: {family} from component files is not built yet")
