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
    recipe = _recipe(source)
    params = {
        "prompt": recipe["prompt"],
        "negative_prompt": recipe["negativePrompt"] or None,
        "width": recipe["width"],
        "height": recipe["height"],
        "steps": recipe["steps"],
        "cfg_scale": recipe["cfgScale"],
        "seed": recipe["seed"],
        "sampler": recipe["sampler"],
    }
    # What a newer recipe names; an older PNG leaves the server's defaults.
    optional = {"scheduler": "scheduler", "clipSkip": "clip_skip"}
    params |= {name: recipe[key] for key, name in optional.items() if recipe.get(key)}
    # A recipe names its model by catalog id since it has `modelHash`; an older one names a
    # folder or file, which no server may list: it is drawn with the server's default.
    if recipe.get("modelHash") and recipe.get("model"):
        params["model"] = recipe["model"]
    if recipe.get("loras"):
        params["loras"] = [(lora["name"], lora["weight"]) for lora in recipe["loras"]]
    # An edit's settings; its images are not in the PNG (see `png_input_hashes`).
    if "strength" in recipe:
        params["strength"] = recipe["strength"]
    if "maskBlur" in recipe:
        params["mask_blur"] = recipe["maskBlur"]
    return params


def png_input_hashes(source: bytes | str | Path) -> dict[str, str]:
    """The SHA-256 of each input image a diffusiond PNG was made from, by the keyword
    argument that takes it ("init_image", "mask_image"); empty for text-to-image. Making
    the PNG again needs the very same files."""
    recipe = _recipe(source)
    hashes = {
        "init_image": recipe.get("initImageSha256"),
        "mask_image": recipe.get("maskImageSha256"),
    }
    return {name: str(value) for name, value in hashes.items() if value}


def _recipe(source: bytes | str | Path) -> dict[str, Any]:
    from diffusiond.imaging import read_recipe  # Pillow, only when needed

    data = source if isinstance(source, bytes) else _read_bounded(Path(source))
    return read_recipe(data)


def _read_bounded(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_PNG_FILE_BYTES:
        raise ValueError(f"the file is {size} bytes, over the limit of {MAX_PNG_FILE_BYTES}")
    with path.open("rb") as file:
        return file.read(MAX_PNG_FILE_BYTES + 1)
