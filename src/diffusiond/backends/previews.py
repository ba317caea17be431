"""Live previews: a small picture straight from the latents, without a VAE pass.

Stable Diffusion's VAE maps each latent pixel to an 8x8 patch whose average colour is close
to a fixed linear function of the latent's 4 channels. Applying that 4x3 matrix to the
latents gives a rough 1/8-scale picture for the cost of a tiny matrix product; it is then
shrunk to at most `PREVIEW_MAX_SIDE` on its long side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image as PILImage

if TYPE_CHECKING:
    from PIL.Image import Image

PREVIEW_MAX_SIDE = 128

# Least-squares fits of the average RGB (in -1..1) of decoded 8x8 patches on each latent
# channel, for the SD 1.x/2.x VAE (the same VAE family), rows = latent channels 0..3.
_SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def latents_to_preview(latents: torch.Tensor) -> Image:
    """An RGB image of the first latent in `latents` (shape [batch, 4, h, w])."""
    first = latents[0].detach().to(device="cpu", dtype=torch.float32)
    factors = torch.tensor(_SD_LATENT_RGB, dtype=torch.float32)
    if first.shape[0] != factors.shape[0]:
        # An unknown latent layout: show the first three channels as they are.
        rgb = first[:3] if first.shape[0] >= 3 else first[:1].expand(3, -1, -1)
        rgb = rgb.permute(1, 2, 0)
    else:
        rgb = torch.einsum("chw,cr->hwr", first, factors)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    picture = PILImage.fromarray(pixels, mode="RGB")
    longest = max(picture.size)
    if longest > PREVIEW_MAX_SIDE:
        scale = PREVIEW_MAX_SIDE / longest
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, PILImage.Resampling.BILINEAR)
    return picture
