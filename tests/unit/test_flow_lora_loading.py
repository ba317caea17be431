"""A LoRA file diffusers' loader reads into no layer of a flow model (SD 3's loader takes
kohya names without converting them, and without a word) fails naming the LoRA, and
leaves the model as it was, rather than drawing as if it had been applied."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from diffusiond.backends.lora_files import LoraCatalog
from diffusiond.backends.loras import LoraLoadError, PipelineLoras
from diffusiond.jobs.models import LoraWeight
from tests.support import flow_loras
from tests.support.families import tiny_family_folder


def test_a_lora_that_loads_into_no_layer_fails_naming_it(tmp_path: Path) -> None:
    import diffusers

    torch.set_num_threads(1)
    folder = tiny_family_folder(tmp_path, "sd3")
    with warnings.catch_warnings():  # diffusers' and transformers' own deprecations
        warnings.simplefilter("ignore")
        pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(
            str(folder), local_files_only=True
        )
    loras = tmp_path / "loras"
    loras.mkdir()
    flow_loras.kohya_sd3_lora(loras / "kohya_names.safetensors")
    flow_loras.peft_lora(folder, "sd3", loras / "diffusers_names.safetensors")
    # "unknown": the architecture check is skipped, as for a model the catalog cannot place
    applied = PipelineLoras(pipeline, LoraCatalog(loras), architecture=lambda: "unknown")
    unread = "'kohya_names' could not be applied to this model: none of its layers"
    with (
        pytest.raises(LoraLoadError, match=unread),
        applied.applied([LoraWeight("kohya_names", 1)]),
    ):
        pass
    assert not getattr(pipeline.transformer, "peft_config", {})
    with applied.applied([LoraWeight("diffusers_names", 1.0)]):
        assert list(pipeline.transformer.peft_config) == ["lora1"]
