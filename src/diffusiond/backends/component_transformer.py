"""A family's diffusion model (its transformer) from a component file's tensors.

`load_transformer` converts the original names (BFL's, Stability's, Tongyi's; a ComfyUI
prefix is dropped) with diffusers' single-file converter for the family, reads the config
from the tensors' shapes, and builds the module in `dtype`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusiond.errors import ModelLoadError


def load_transformer(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    raise ModelLoadError(f"diffusion_model {path}: {family} from component files is not built yet")
