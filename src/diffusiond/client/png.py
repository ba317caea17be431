"""Reading back what a diffusiond PNG was made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A file larger than this is refused before it is read: the largest PNG whose recipe is
# read back (16 Mpx, RGBA, stored uncompressed) is about 64 MiB.
MAX_PNG_FILE_BYTES = 128 * 1024 * 1024


def png_parameters(source: bytes | str | Path) -> dict[str, Any]:
    """The request a diffusiond PNG (its bytes, or a path) was made with, as keyword
    arguments of `Client.generate`/`Client.start`: same seed, same everything, count 1.

    The file goes through diffusiond's guarded image reader (PNG only here, its size
    checked from the header before decoding). Raises ValueError naming what is wrong when
    the file is not a readable diffusiond PNG, OSError when it cannot be read.
    """
    from diffusiond.imaging import read_recipe  # Pillow, only when needed

    data = source if isinstance(source, bytes) else _read_bounded(Path(source))
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


def _read_bounded(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_PNG_FILE_BYTES:
        raise ValueError(f"the file is {size} bytes, over the limit of {MAX_PNG_FILE_BYTES}")
    with path.open("rb") as file:
        return file.read(MAX_PNG_FILE_BYTES + 1)
