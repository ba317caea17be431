"""Editing through the users of the API: the CLI (--init-image, --mask, --from-png of an
edit) and the Python client (a path, bytes or a PIL image), against the real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from diffusiond.client import Client, png_input_hashes, png_parameters
from diffusiond.imaging import PNG_TEXT_KEY
from tests.integration.test_editing import (
    BLUR,
    INIT,
    assert_kept_exactly,
    hole_mask,
    noise,
)
from tests.support.server import REPO_ROOT, ServerProcess, server_env


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond", *args],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def inputs(folder: Path) -> tuple[Path, Path]:
    init, mask = folder / "in.png", folder / "mask.png"
    INIT.save(init)
    hole_mask(INIT.width, INIT.height).save(mask)
    return init, mask


def test_cli_inpaints_and_from_png_needs_the_same_files(
    server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    init, mask = inputs(tmp_path)
    edit = ("--init-image", str(init), "--mask", str(mask), "--mask-blur", str(BLUR))
    common = ("--steps", "5", "--seed", "3", "--server", server.url)
    made = cli("generate", "a door", *edit, "--strength", "0.6", *common, "-o", str(tmp_path))
    assert made.returncode == 0, made.stderr
    (result,) = [Path(line) for line in made.stdout.split()]
    with Image.open(result) as picture:
        assert picture.size == INIT.size
        recipe = json.loads(picture.info[PNG_TEXT_KEY])
        assert_kept_exactly(np.asarray(picture.convert("RGB")), INIT)
    assert recipe["mode"] == "inpaint"
    assert (recipe["strength"], recipe["maskBlur"]) == (0.6, BLUR)
    assert png_input_hashes(result) == {
        "init_image": recipe["initImageSha256"],
        "mask_image": recipe["maskImageSha256"],
    }
    assert png_parameters(result)["strength"] == 0.6

    again = ("generate", "--from-png", str(result), "--server", server.url)
    missing = cli(*again, "-o", str(tmp_path / "x"))
    assert missing.returncode == 2
    assert "give the same file again with --init-image" in missing.stderr
    other = tmp_path / "other.png"
    noise(INIT.width, INIT.height, seed=8).save(other)
    wrong = cli(*again, "--init-image", str(other), "--mask", str(mask), "-o", str(tmp_path))
    assert wrong.returncode == 2
    assert f"--init-image {other} is not the file" in wrong.stderr
    remade = cli(*again, "--init-image", str(init), "--mask", str(mask), "-o", str(tmp_path / "r"))
    assert remade.returncode == 0, remade.stderr
    (copy,) = [Path(line) for line in remade.stdout.split()]
    with Image.open(result) as first, Image.open(copy) as second:
        assert np.array_equal(np.asarray(first), np.asarray(second))


def test_a_missing_input_file_is_named(server: ServerProcess, tmp_path: Path) -> None:
    gone = tmp_path / "gone.png"
    failed = cli("generate", "x", "--init-image", str(gone), "--server", server.url)
    assert failed.returncode == 2
    assert f"--init-image {gone}: no such file" in failed.stderr


def test_the_client_takes_a_path_bytes_or_a_pil_image(
    server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    init, mask = inputs(tmp_path)
    with Client(server.url) as api:
        from_path = api.generate(
            "a boat",
            init_image=init,
            mask_image=mask,
            steps=4,
            seed=5,
            strength=0.7,
            mask_blur=BLUR,
        )
        from_pil = api.generate(
            "a boat",
            init_image=INIT,
            mask_image=mask.read_bytes(),
            steps=4,
            seed=5,
            strength=0.7,
            mask_blur=BLUR,
        )
        plain = api.generate("a boat", init_image=INIT, steps=2, width=64, height=64)
    (first,), (second,), (small,) = from_path, from_pil, plain
    assert (first.width, first.height) == INIT.size
    assert (small.width, small.height) == (64, 64)
    with (
        Image.open(first.save(tmp_path / "a.png")) as a,
        Image.open(second.save(tmp_path / "b.png")) as b,
    ):
        assert_kept_exactly(np.asarray(a.convert("RGB")), INIT)
        # the same pixels sent as a file or as a PIL image (encoded again as PNG)
        assert np.array_equal(np.asarray(a), np.asarray(b))
