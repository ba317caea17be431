"""Filling a module built from a config with a component file's tensors, checked first.

A module is built without weights of its own (on the meta device, or with transformers'
initialisation skipped), then takes the file's tensors as they are (`assign`): they were
read in the compute dtype, so no float32 copy of the model is ever made. Before that every
tensor is checked against the module: one missing, one too many or one of the wrong shape
is a ModelLoadError naming the file, the role and the tensor, never a stack trace.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from diffusiond.errors import ModelLoadError

_SHOWN = 3


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_tensors(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    *,
    optional: Collection[str] = (),
) -> None:
    """A ModelLoadError (`what` names the role and file) unless `state` holds exactly the
    module's tensors (those in `optional` may be absent), each of its shape."""
    expected = module.state_dict()
    missing = sorted(name for name in expected if name not in state and name not in optional)
    if missing:
        raise ModelLoadError(
            f"{what}: {len(missing)} tensors missing ({_shown(missing)}); "
            "is the file cut short, or another model?"
        )
    unexpected = sorted(name for name in state if name not in expected)
    if unexpected:
        raise ModelLoadError(
            f"{what}: {len(unexpected)} tensors this model has no place for "
            f"({_shown(unexpected)}); is it another model's file?"
        )
    wrong = [
        f"{name} is {tuple(tensor.shape)}, not {tuple(expected[name].shape)}"
        for name, tensor in state.items()
        if tuple(tensor.shape) != tuple(expected[name].shape)
    ]
    if wrong:
        raise ModelLoadError(f"{what}: tensors of the wrong shape: {_shown(wrong)}")


def assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load the checked `state` into `module` as it is, then refuse any tensor left empty."""
    module.load_state_dict(dict(state), strict=False, assign=True)
    empty = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if empty:
        raise ModelLoadError(f"{what}: no weights for {_shown(sorted(empty))}")
    module.eval()
    module.requires_grad_(False)


def build_on_meta(factory: Callable[[], Any]) -> Any:
    """A module made with its tensors on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return factory()


def build_uninitialised(factory: Callable[[], Any], dtype: torch.dtype) -> Any:
    """A transformers model made in `dtype` with its initialisation skipped: its weights
    are untouched allocations the file's tensors replace, while the buffers it computes
    (rotary frequencies, position ids) are real."""
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            return factory()
    finally:
        torch.set_default_dtype(previous)


def strip_prefix(state: Mapping[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """`state` with whatever stands before `anchor` in its first key ending so removed from
    every key that has it (a ComfyUI or combined file's prefix); unchanged if none does."""
    found = next((name for name in state if name.endswith(anchor)), None)
    if found is None:
        return dict(state)
    prefix = found[: len(found) - len(anchor)]
    return {
        name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)
    }


def describe(role: str, path: Path) -> str:
    return f"{role} {path}"
