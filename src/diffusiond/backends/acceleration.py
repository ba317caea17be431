"""Making the loaded UNet and VAE faster: channels-last memory format and `--compile`.

Channels-last (NHWC) lets oneDNN on the CPU and cuDNN on CUDA run every convolution
without converting its input and output around it; in eager mode it makes the SD 1.5
decode about 2x and a step about 1.2x faster on this project's CPU, for the same numbers
within bfloat16 rounding. Only the weights are converted: convolutions propagate the
format to their outputs, so the latents need no conversion.

`--compile` runs the UNet (and the VAE decoder) through `torch.compile` (inductor). Sizes:
the first image size is compiled for that size; a second size makes dynamo mark the
changed dimensions dynamic and compile once more, after which any size reuses that graph.
The compiled code is kept in inductor's caches under DIFFUSIOND_HOME, so a restart loads
it instead of compiling again.

On the CPU, large blocks are kept in the heap for reuse (`allocator.reuse_large_blocks`): glibc
otherwise maps every allocation over 32 MB afresh and unmaps it when freed, and the
512x512 decode's activations (64-256 MB each) were faulted in from zeroed pages ~890
thousand times per decode, and unmapped under the other OpenMP thread (a TLB shootdown each
time). Keeping them halves the decode on 2 threads: bench/vs_diffusers.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The modules of a Stable Diffusion pipeline whose convolutions dominate its time.
CONV_MODULES = ("unet", "vae")


def use_channels_last(pipeline: Any) -> None:
    """Store the 4-d weights of the pipeline's UNet and VAE channels-last, in place."""
    for name in CONV_MODULES:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            for weight in module.parameters():
                if weight.dim() == 4:  # convolutions' (out, in, kh, kw)
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last)


def conv_weights_channels_last(module: torch.nn.Module) -> bool:
    """True when every 2-d convolution weight of `module` is stored channels-last."""
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return bool(weights) and all(
        w.is_contiguous(memory_format=torch.channels_last) for w in weights
    )


def inductor_cache_dir(home: Path) -> Path:
    return home / "compile-cache"


def use_inductor_cache(home: Path) -> Path:
    """Point inductor's on-disk caches (its kernels and the FX graph cache) under `home`.

    Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it compiles, but fills it in with its
    /tmp default the first time it is asked (importing some of torch does), so the value
    is overwritten rather than defaulted: DIFFUSIOND_HOME decides where the cache lives.
    """
    cache = inductor_cache_dir(home)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    return cache


def compile_pipeline(pipeline: Any, home: Path) -> None:
    """Compile the UNet and the VAE decoder in place (each compiles on its first call)."""
    cache = use_inductor_cache(home)
    log.info("compiling the UNet and VAE decoder on first use (inductor cache: %s)", cache)
    pipeline.unet.compile()
    decoder = getattr(pipeline.vae, "decoder", None)
    if isinstance(decoder, torch.nn.Module):
        decoder.compile()
