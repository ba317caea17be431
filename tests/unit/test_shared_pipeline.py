"""A request's pipeline shares the loaded modules and leaves their dtype alone: diffusers'
`from_pipe` cast them to float32 (doubling a bfloat16 model's memory on its first edit or
flow-family request); backends/shared_pipeline.py builds the pipeline without a cast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusiond.backends.base import ImageSpec
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.backends.families import FAMILIES
from diffusiond.backends.flow_backend import FlowBackend
from tests.support.families import tiny_family_folder
from tests.support.model_files import tiny_sdxl_folder
from tests.unit.test_editing_models import IMG2IMG, INPAINT


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def dtypes(pipeline: object) -> set[torch.dtype]:
    modules = [m for m in vars(pipeline).values() if isinstance(m, torch.nn.Module)]
    return {p.dtype for module in modules for p in module.parameters()}


def test_a_flow_request_keeps_the_models_bfloat16(home: Path) -> None:
    backend = FlowBackend(
        model_path=tiny_family_folder(home, "sd3"),
        family=FAMILIES["sd3"],
        device="cpu",
        torch_threads=1,
        dtype="bfloat16",
    )
    backend.load()
    assert dtypes(backend._pipeline) == {torch.bfloat16}
    spec = ImageSpec("a boat", "", 64, 64, 2, 3.0, 1, "euler")
    backend.generate(spec, lambda *_: None, lambda: False)
    backend.generate(
        ImageSpec("a boat", "", 64, 64, 2, 3.0, 1, "euler", edit=IMG2IMG),
        lambda *_: None,
        lambda: False,
    )
    assert dtypes(backend._pipeline) == {torch.bfloat16}


def test_an_sd_edit_keeps_the_models_bfloat16(home: Path) -> None:
    backend = DiffusersBackend(
        model_path=tiny_sdxl_folder(home),
        home=home,
        device="cpu",
        torch_threads=1,
        dtype="bfloat16",
    )
    backend.load()
    assert dtypes(backend._pipeline) == {torch.bfloat16}
    for edit in (IMG2IMG, INPAINT):
        spec = ImageSpec("a boat", "", 64, 64, 4, 5.0, 3, "euler_a", edit=edit)
        backend.generate(spec, lambda *_: None, lambda: False)
    assert dtypes(backend._pipeline) == {torch.bfloat16}
