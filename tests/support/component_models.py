"""The tiny family models of tests/support/families.py written as split component files,
in the layouts people download: the diffusion model in its original names (BFL's,
Stability's, ...; or a city96-style GGUF), the VAE as released, the text encoders in Hugging
Face names (or llama.cpp GGUFs carrying their tokenizers), and a components.json naming them.

The weights are the diffusers folder's own, so a components model draws the folder's
picture. The tiny text encoders' tokenizers are not the real ones (their vocabularies are a
few hundred tokens), so each role's tokenizer is written into the manifest's `tokenizers`
folder, except where a GGUF carries its own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from diffusiond.backends.component_pipeline import encoder_arguments
from diffusiond.backends.components import MANIFEST_NAME
from diffusiond.backends.families import FAMILIES
from tests.support import encoder_files, flux_layout, mmdit_layout
from tests.support.families import tiny_family_folder

_FLUX_LAYOUT = ("flux1", "flux2", "chroma")


def tiny_pipeline(home: Path, family: str) -> Any:
    """The family's tiny diffusers folder loaded in float32."""
    import diffusers

    folder = tiny_family_folder(home, family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' own deprecations while building
        return getattr(diffusers, FAMILIES[family].pipeline).from_pretrained(
            str(folder), local_files_only=True
        )


def write_parts(
    folder: Path, family: str, pipeline: Any, *, fmt: str = "safetensors", gguf_text: bool = False
) -> dict[str, str]:
    """The pipeline's modules written into `folder` by role; {role: file name}. `fmt` is
    the diffusion model's ("safetensors", "gguf-f16", "gguf-q8_0"); with `gguf_text`, a T5 or
    LLM text encoder is a GGUF with its tokenizer, else a .safetensors whose tokenizer goes
    into `folder/tokenizers/ROLE/`."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".safetensors" if fmt == "safetensors" else ".gguf"
    layout = flux_layout if family in _FLUX_LAYOUT else mmdit_layout
    diffusion = folder / f"{family}-transformer{suffix}"
    layout.write_diffusion_model(diffusion, family, pipeline.transformer, fmt)
    names = {"diffusion_model": diffusion.name}
    names["vae"] = encoder_files.write_vae(folder / "vae.safetensors", family, pipeline.vae).name
    for role, encoder_name, tokenizer_name in encoder_arguments(family):
        tokenizer = getattr(pipeline, tokenizer_name)
        as_gguf = gguf_text and role in ("t5xxl", "llm")
        path = encoder_files.write_text_encoder(
            folder / role,
            role,
            getattr(pipeline, encoder_name),
            "gguf" if as_gguf else "safetensors",
            tokenizer,
        )
        names[role] = path.name
        if not as_gguf:
            encoder_files.write_tokenizer_folder(folder / "tokenizers", role, tokenizer)
    return names


def component_folder(
    home: Path, family: str, *, fmt: str = "safetensors", gguf_text: bool = False
) -> Path:
    """A models-dir folder of `family`'s tiny model as split components with its
    components.json, built under `home` the first time."""
    tag = fmt + ("-gguftext" if gguf_text else "")
    folder = home / f"parts-{family}-{tag}"
    if (folder / MANIFEST_NAME).is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=home))
    try:
        names = write_parts(
            staging, family, tiny_pipeline(home, family), fmt=fmt, gguf_text=gguf_text
        )
        manifest: dict[str, str] = {**names}
        if (staging / "tokenizers").is_dir():
            manifest["tokenizers"] = "tokenizers"
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ComfyUI's prefixes for the parts of a single-file checkpoint (components.py reads them).
_COMFY_PARTS = {
    "diffusion_model": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}


def single_file(parts: Path, target: Path, *, only_diffusion_model: bool = False) -> Path:
    """The .safetensors parts of a components folder merged into one ComfyUI-style
    checkpoint, each under its prefix (or the diffusion model alone)."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((parts / MANIFEST_NAME).read_text())
    merged = {}
    for role, prefix in _COMFY_PARTS.items():
        if role not in manifest or (only_diffusion_model and role != "diffusion_model"):
            continue
        tensors = load_file(str(parts / manifest[role]))
        merged.update({prefix + name: tensor for name, tensor in tensors.items()})
    save_file(merged, str(target))
    return target
