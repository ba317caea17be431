"""Where a loaded pipeline's weights live on CUDA: `--offload auto|none|model|sequential`.

The big flow-matching models do not fit every GPU (FLUX.1 is 12 B parameters in its
transformer alone, Qwen-Image 20 B). diffusers offers two ways to run a pipeline on a GPU
smaller than it, both through accelerate hooks:

- `model` (`enable_model_cpu_offload`): the weights stay in host memory and each module
  (text encoder, transformer, VAE) is moved to the GPU whole when it runs, the previous one
  moved back first. The GPU holds one module at a time; a step costs the same once the
  transformer is there, and a request pays one host-to-GPU copy of each module.
- `sequential` (`enable_sequential_cpu_offload`): every layer is copied to the GPU just
  before it runs and dropped after. The GPU holds one layer at a time; every step copies
  the whole transformer again, so it is many times slower. The last resort.

`auto` chooses from the free memory the GPU reports at load (`torch.cuda.mem_get_info`),
the model's weight bytes and its largest module's bytes, in this order:

    weights + working <= free          -> none        (everything on the GPU)
    largest module + working <= free   -> model
    otherwise                          -> sequential

`working` is what a generation needs beside the weights: the activations of one step and of
the VAE decode, the CUDA libraries' workspaces and the allocator's slack. It grows with the
image, so it is sized for the largest image the server accepts (`--max-pixels`):

    working = WORKING_BASE_BYTES + pixels * WORKING_BYTES_PER_PIXEL
            = 1 GiB + pixels * 3 KiB          (4 GiB at 1024 x 1024, 1.75 GiB at 512 x 512)

The per-pixel term is dominated by the VAE decoder, whose last blocks hold several
128-channel tensors at the full image size (128 x 2 bytes = 256 bytes a pixel each, a few
alive at once in half precision), and by its mid-block attention over the latent pixels;
the transformer's own activations at 1024 x 1024 are smaller (a few thousand tokens).
bench/family_memory.py measures the activations of a transformer step and a VAE decode on
the CPU; the constants have not been checked on a CUDA device.

On the CPU there is nothing to offload to: the choice is always `none`, and an explicit
`model` or `sequential` is logged as ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "none", "model", "sequential")

GIB = 1024**3
WORKING_BASE_BYTES = 1 * GIB
WORKING_BYTES_PER_PIXEL = 3 * 1024
DEFAULT_PIXELS = 1024 * 1024  # --max-pixels' default

# free and total bytes of a CUDA device, as torch.cuda.mem_get_info(device) answers
MemGetInfo = Callable[[Any], tuple[int, int]]


@dataclass(frozen=True)
class ModelBytes:
    """A pipeline's weights: all its modules together, and the largest one."""

    total: int
    largest: int
    largest_name: str = ""


@dataclass(frozen=True)
class OffloadChoice:
    """The mode chosen and the numbers it was chosen from (free is None on the CPU)."""

    mode: str
    requested: str
    free_bytes: int | None
    weights: ModelBytes
    working_bytes: int

    def describe(self) -> str:
        """One line for the log: the choice and why."""
        if self.free_bytes is None:
            return f"offload {self.mode} (requested {self.requested}; not on CUDA)"
        return (
            f"offload {self.mode} (requested {self.requested}): {_gib(self.free_bytes)} free "
            f"on the GPU, weights {_gib(self.weights.total)}, largest module "
            f"{self.weights.largest_name or '?'} {_gib(self.weights.largest)}, working "
            f"memory {_gib(self.working_bytes)}"
        )


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def working_bytes(pixels: int) -> int:
    """The memory a generation of `pixels` pixels needs beside the weights (the module
    docstring gives the formula and its reasons)."""
    return WORKING_BASE_BYTES + max(0, pixels) * WORKING_BYTES_PER_PIXEL


def choose_offload(free: int, weights: ModelBytes, working: int) -> str:
    """`none`, `model` or `sequential` for a GPU with `free` bytes free (see the module
    docstring): the least offloading whose GPU share, with `working` beside it, fits."""
    if weights.total + working <= free:
        return "none"
    if weights.largest + working <= free:
        return "model"
    return "sequential"


def module_bytes(module: Any) -> int:
    """The bytes of a torch module's parameters and buffers (each at its own element size)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors)


def pipeline_bytes(pipeline: Any) -> ModelBytes:
    """The weight bytes of every torch module among a diffusers pipeline's components."""
    sizes = {
        name: module_bytes(component)
        for name, component in pipeline.components.items()
        if _is_module(component)
    }
    if not sizes:
        return ModelBytes(0, 0)
    largest = max(sizes, key=lambda name: sizes[name])
    return ModelBytes(sum(sizes.values()), sizes[largest], largest)


def _is_module(value: Any) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)


def resolve_offload(
    requested: str,
    device: str,
    weights: ModelBytes,
    pixels: int,
    free_bytes: int | None,
) -> OffloadChoice:
    """The mode for `requested` on `device`; `free_bytes` is what the GPU reports free
    (None on the CPU). An explicit mode wins over the measurement on CUDA."""
    working = working_bytes(pixels)
    if not device.startswith("cuda") or free_bytes is None:
        if requested in ("model", "sequential"):
            log.warning("--offload %s ignored: the model runs on %s", requested, device)
        return OffloadChoice("none", requested, None, weights, working)
    mode = requested if requested != "auto" else choose_offload(free_bytes, weights, working)
    return OffloadChoice(mode, requested, free_bytes, weights, working)


def cuda_free_bytes(device: str, mem_get_info: MemGetInfo | None = None) -> int:
    """Free bytes of the CUDA device `device` ("cuda" or "cuda:N") now."""
    if mem_get_info is None:
        import torch

        mem_get_info = torch.cuda.mem_get_info
    free, _total = mem_get_info(device)
    return int(free)


def place_pipeline(
    pipeline: Any,
    device: str,
    requested: str = "auto",
    pixels: int = DEFAULT_PIXELS,
    mem_get_info: MemGetInfo | None = None,
) -> OffloadChoice:
    """Put a loaded pipeline (still in host memory) on `device` as `--offload` says, and
    log the choice with its numbers once. Replaces `pipeline.to(device)` in a backend's
    load: with an offload the hooks move the modules to the GPU when they run."""
    weights = pipeline_bytes(pipeline)
    free = cuda_free_bytes(device, mem_get_info) if device.startswith("cuda") else None
    choice = resolve_offload(requested, device, weights, pixels, free)
    apply_offload(pipeline, choice.mode, device)
    log.info(choice.describe())
    return choice


class Placement:
    """A backend's `--offload`: what was asked for, and, once loaded, the mode chosen."""

    def __init__(
        self,
        requested: str = "auto",
        pixels: int = DEFAULT_PIXELS,
        mem_get_info: MemGetInfo | None = None,  # None: torch.cuda.mem_get_info
    ) -> None:
        if requested not in OFFLOAD_MODES:
            raise ValueError(f"offload {requested!r} is not one of {', '.join(OFFLOAD_MODES)}")
        self.requested = requested
        self.pixels = pixels
        self.mode = "none"  # what /health reports; before the load nothing is on a GPU
        self._mem_get_info = mem_get_info

    def place(self, pipeline: Any, device: str) -> OffloadChoice:
        choice = place_pipeline(pipeline, device, self.requested, self.pixels, self._mem_get_info)
        self.mode = choice.mode
        return choice


def apply_offload(pipeline: Any, mode: str, device: str) -> None:
    """Move `pipeline` to `device` (`none`) or install diffusers' offload hooks for it."""
    if mode == "none":
        pipeline.to(device)
    elif mode == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown offload mode {mode!r} (one of {', '.join(OFFLOAD_MODES)})")
