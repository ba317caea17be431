"""A family's diffusion model (its transformer) from a component file's tensors.

The original names (Black Forest Labs', Stability's, Tongyi's, Qwen's; a ComfyUI
`model.diffusion_model.` prefix is dropped) are converted by diffusers' single-file converter
for the family, the config is read from the tensors' shapes (what the weights cannot tell is
the family's published value), and the module is built in `dtype`. FLUX.1, FLUX.2 and Chroma
share one layout (transformer_flux.py); SD 3.x, Z-Image and Qwen-Image have their own
(transformer_mmdit.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_FLUX_LAYOUT = ("flux1", "flux2", "chroma")


def load_transformer(
    family: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path
) -> Any:
    """The family's transformer module from `state_dict` (read from `path`), in `dtype`;
    a ModelLoadError naming `path` when the tensors are not such a model."""
    if family in _FLUX_LAYOUT:
        from diffusiond.backends.transformer_flux import load_flux_layout

        return load_flux_layout(family, state_dict, dtype, path)
    from diffusiond.backends.transformer_mmdit import load_mmdit_layout

    return load_mmdit_layout(family, state_dict, dtype, path)
