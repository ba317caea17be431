"""Reading back what a diffusiond PNG was made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def png_parameters(source: bytes | str | Path) -> dict[str, Any]:
    """The request a diffusiond PNG (its bytes, or a path) was made with, as keyword
    arguments of `Client.generate`/`Client.start`: same seed, same everything, count 1.

    Raises ValueError naming what is wrong when the file is not a diffusiond PNG.
    """
    from diffusiond.imaging import read_recipe  # Pillow, only when needed

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    recipe = read_recipe(data)
    return {
        "prompt": recipe["prompt"],
        "negative_prompt": recipe["negativePrompt"] or None,
        "width": recipe["width"],
        "height": recipe["height"],
        "steps": recipe["steps"],
        "cfg_scale": recipe["cfgScale"],
        "seed": recipe["seed"],
        "sampler": recipe["sampler"],
    }
