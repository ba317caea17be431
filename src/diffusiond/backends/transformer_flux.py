"""Placeholder until the flux-layout loader lands: every such model is refused, named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusiond.errors import ModelLoadError


def load_flux_layout(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    del state_dict, dtype
    raise ModelLoadError(f"diffusion_model {path}: {family} from component files is not built yet")
