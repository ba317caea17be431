"""Editing through the real backend on tiny models: an SDXL-shaped one (img2img and
inpainting pipelines built from its modules) and a 9-channel inpainting one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.jobs.models import EditInputs, InputImage, Stage
from tests.support.model_files import tiny_inpainting_model_files, tiny_sdxl_folder


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


INIT = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))
IMG2IMG = EditInputs(InputImage(png(INIT), 64, 64), 0.5)
INPAINT = EditInputs(InputImage(png(INIT), 64, 64), 0.5, InputImage(png(MASK), 64, 64), 0)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def backend_of(model: Path) -> DiffusersBackend:
    backend = DiffusersBackend(
        model_path=model, home=model.parent, device="cpu", torch_threads=1, dtype="float32"
    )
    backend.load()
    return backend


def draw(backend: DiffusersBackend, edit: EditInputs | None) -> tuple[np.ndarray, set[int]]:
    """The picture, and the diffusion totals the backend reported."""
    totals: set[int] = set()

    def on_stage(stage: Stage, _step: int, total: int) -> None:
        if stage is Stage.DIFFUSION:
            totals.add(total)

    spec = ImageSpec("a boat", "", 64, 64, 8, 5.0, 3, "euler_a", edit=edit)
    return np.asarray(backend.generate(spec, on_stage, lambda: False)), totals


def outside_kept(picture: np.ndarray) -> bool:
    keep = np.asarray(MASK) == 0
    return bool(np.array_equal(picture[keep], np.asarray(INIT)[keep]))


def test_sdxl_img2img_and_inpainting_share_the_loaded_modules(home: Path) -> None:
    backend = backend_of(tiny_sdxl_folder(home))
    assert backend.info().architecture == "sdxl"
    text, text_totals = draw(backend, None)
    image, image_totals = draw(backend, IMG2IMG)
    painted, painted_totals = draw(backend, INPAINT)
    assert (text_totals, image_totals, painted_totals) == ({8}, {4}, {4})
    assert not np.array_equal(text, image)
    assert outside_kept(painted)
    assert not outside_kept(image)  # without a mask every pixel is redrawn


def test_a_nine_channel_model_from_a_single_file_inpaints(home: Path) -> None:
    folder, single_file = tiny_inpainting_model_files(home)
    backend = DiffusersBackend(
        model_path=single_file,
        home=home,
        device="cpu",
        torch_threads=1,
        dtype="float32",
        model_config=folder,
    )
    backend.load()
    painted, totals = draw(backend, INPAINT)
    assert totals == {4}
    assert outside_kept(painted)
    text, _ = draw(backend, None)
    assert text.shape == (64, 64, 3)
