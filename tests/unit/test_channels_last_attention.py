"""The UNet's attention blocks hand their output on channels-last (no copy to NCHW), with
the same numbers (backends/acceleration.py keep_attention_outputs_channels_last)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from diffusiond.backends.acceleration import keep_attention_outputs_channels_last
from diffusiond.backends.builtin_model import ensure_builtin_model


def test_attention_outputs_stay_channels_last_with_the_same_numbers(tmp_path: Path) -> None:
    folder = ensure_builtin_model(tmp_path)
    plain = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()
    patched = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    blocks = [m for m in patched.modules() if isinstance(m, Transformer2DModel)]
    assert keep_attention_outputs_channels_last(patched) == len(blocks) > 0
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, plain.config.cross_attention_dim, generator=generator)[:, None]
    text = text.expand(2, 8, -1).contiguous()
    outputs: list[torch.Tensor] = []
    block = blocks[0]
    block.register_forward_hook(lambda _m, _i, out: outputs.append(out[0]))
    with torch.inference_mode():
        want = plain(latents, 10, encoder_hidden_states=text).sample
        got = patched(latents.contiguous(memory_format=torch.channels_last), 10, text).sample
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    assert not outputs[0].is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
