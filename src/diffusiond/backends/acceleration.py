"""Making the loaded UNet and VAE faster: channels-last memory format and `--compile`.

Channels-last (NHWC) lets oneDNN on the CPU and cuDNN on CUDA run every convolution
without converting its input and output around it; in eager mode it makes the SD 1.5
decode about 2x and a step about 1.2x faster on this project's CPU, for the same numbers
within bfloat16 rounding. Only the weights are converted: convolutions propagate the
format to their outputs, so the latents need no conversion.

`--compile` runs the UNet through `torch.compile` (inductor). Sizes:
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
import types
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The modules of a Stable Diffusion pipeline whose convolutions dominate its time.
CONV_MODULES = ("unet", "vae")


def use_channels_last(pipeline: Any) -> None:
    """Store the 4-d weights of the pipeline's UNet and VAE channels-last, in place, and
    keep the UNet's attention blocks' outputs channels-last too."""
    for name in CONV_MODULES:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            for weight in module.parameters():
                if weight.dim() == 4:  # convolutions' (out, in, kh, kw)
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last)
    unet = getattr(pipeline, "unet", None)
    if isinstance(unet, torch.nn.Module):
        keep_attention_outputs_channels_last(unet)


def keep_attention_outputs_channels_last(unet: torch.nn.Module) -> int:
    """Each of the UNet's attention blocks (diffusers' Transformer2DModel) hands its output
    on as it is, channels-last, instead of copying it to contiguous first; the number of
    blocks changed.

    The block reads a channels-last input as tokens for free (its permute is a view), but
    ends with `.permute(0, 3, 1, 2).contiguous()`: a copy to NCHW, which the next
    channels-last convolution reorders back, and a residual add of two layouts. Without the
    copy the permuted tensor is channels-last already. Measured on the SD 1.5-shaped UNet, a
    CFG step at 512x512 in bfloat16 on 2 threads, alternating in one process: 2.17 s
    channels-last weights only, 1.87 s with this, 2.20 s plain (the same output within
    bfloat16 rounding). It replaces a private method of diffusers' class on each instance;
    where a diffusers version lacks it, nothing is changed.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    changed = 0
    for module in unet.modules():
        if isinstance(module, Transformer2DModel) and hasattr(
            module, "_get_output_for_continuous_inputs"
        ):
            module._get_output_for_continuous_inputs = types.MethodType(
                _channels_last_output, module
            )
            changed += 1
    return changed


def _channels_last_output(  # noqa: PLR0917 -- diffusers calls it with these positionals
    self: Any,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    batch_size: int,
    height: int,
    width: int,
    inner_dim: int,
) -> torch.Tensor:
    """diffusers' Transformer2DModel output for continuous inputs, without the copy."""
    if not self.use_linear_projection:
        grid = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = self.proj_out(grid)
    else:
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim)
        hidden_states = hidden_states.permute(0, 3, 1, 2)
    return hidden_states + residual


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
    """Compile the UNet in place (it compiles on its first call).

    Only the UNet: the compiled VAE decoder measured slower than the eager channels-last one
    with its heap-reused blocks (SD 1.5-shaped, 512², bf16, 2 threads: 2.71 s against 1.72 s
    a decode; docs/benchmarks.md), so it is left eager.
    """
    cache = use_inductor_cache(home)
    log.info("compiling the UNet on first use (inductor cache: %s)", cache)
    pipeline.unet.compile()
