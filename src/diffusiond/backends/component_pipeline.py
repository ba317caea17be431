"""A flow family's pipeline assembled from its component files (components.py).

Each file is read tensor by tensor into the compute dtype (a GGUF's quantized tensors
dequantized, as gguf_file.py does for whole SD checkpoints), converted from its original
names by diffusers' own single-file converters and built into the family's module with a
config read from the tensors' shapes (component_transformer.py; the VAE and the text
encoders in component_encoders.py). What the weights cannot tell (the sampler's shift, the
latent scaling) is the family's default, below. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusiond.backends.component_read import read_component
from diffusiond.backends.components import ComponentFiles
from diffusiond.backends.families import FAMILIES
from diffusiond.errors import ModelLoadError

# The scheduler configs of the families' published models (a diffusers folder's own
# scheduler_config.json wins; these stand in when there is none). FLUX.1 schnell has no
# guidance embedder and draws without the dynamic shift.
_DYNAMIC = {
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "flux1": {"shift": 3.0, **_DYNAMIC},
    "flux1-schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    "flux2": {"shift": 3.0, **_DYNAMIC},
    "chroma": {"shift": 3.0, **_DYNAMIC},  # Chroma publishes FLUX.1 dev's
    "sd3": {"shift": 3.0},
    "zimage": {"shift": 3.0},
    "qwenimage": {
        "shift": 1.0,
        **_DYNAMIC,
        "max_shift": 0.9,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
    },
}


def encoder_arguments(family: str) -> list[tuple[str, str, str]]:
    """(role, text encoder argument, tokenizer argument) of the family's pipeline: the
    first encoder is `text_encoder`, the second `text_encoder_2`, and so on."""
    out = []
    for index, role in enumerate(FAMILIES[family].text_encoders):
        suffix = "" if index == 0 else f"_{index + 1}"
        out.append((role, f"text_encoder{suffix}", f"tokenizer{suffix}"))
    return out


def scheduler_defaults(family: str, transformer: Any) -> dict[str, Any]:
    """The flow-matching scheduler config for a family's model built from components."""
    if family == "flux1" and not getattr(transformer.config, "guidance_embeds", True):
        return dict(SCHEDULER_DEFAULTS["flux1-schnell"])
    return dict(SCHEDULER_DEFAULTS[family])


def refuse_variant(family: str, config: Any, path: Path) -> None:
    """A ModelLoadError for the family's variants its text-to-image pipeline cannot draw:
    FLUX.1 Fill, Depth and Kontext take image channels besides the latents; FLUX.2 dev has
    a guidance embedder and another text encoder (Mistral) than klein's Qwen3."""
    if family == "flux1" and getattr(config, "in_channels", 64) != 64:
        raise ModelLoadError(
            f"diffusion_model {path}: a FLUX.1 model with {config.in_channels} input channels "
            "(Fill, Depth or Kontext) needs another pipeline than text-to-image FLUX.1"
        )
    if family == "flux2" and getattr(config, "guidance_embeds", False):
        raise ModelLoadError(
            f"diffusion_model {path}: FLUX.2 dev (a guidance embedder) is not supported; "
            "FLUX.2 klein is"
        )


def build_pipeline(
    components: ComponentFiles, dtype: torch.dtype, *, gguf_weights: str = "dequantize"
) -> Any:
    """The family's text-to-image pipeline over the modules built from `components`; a
    GGUF diffusion model's quantized linear weights kept quantized as `gguf_weights` says
    (gguf_weights.py)."""
    import diffusers

    from diffusiond.backends.component_encoders import load_text_encoder, load_vae
    from diffusiond.backends.component_transformer import load_transformer
    from diffusiond.backends.gguf_weights import choose

    family = components.family
    files = components.files
    prefixes = components.prefixes
    keep = choose(gguf_weights, files["diffusion_model"], dtype)
    diffusion = read_component(
        files["diffusion_model"], dtype, prefixes.get("diffusion_model", ""), keep_quantized=keep
    )
    transformer = load_transformer(family, diffusion, dtype, files["diffusion_model"])
    del diffusion  # the loader took what it needed
    refuse_variant(family, transformer.config, files["diffusion_model"])
    vae_tensors = read_component(files["vae"], dtype, prefixes.get("vae", ""))
    vae = load_vae(family, vae_tensors, dtype, files["vae"])
    parts: dict[str, Any] = {"transformer": transformer, "vae": vae}
    for role, encoder_name, tokenizer_name in encoder_arguments(family):
        encoder, tokenizer = load_text_encoder(
            family, role, files[role], dtype, components.tokenizers, prefix=prefixes.get(role, "")
        )
        parts[encoder_name] = encoder
        parts[tokenizer_name] = tokenizer
    parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        scheduler_defaults(family, transformer)
    )
    pipeline_class = getattr(diffusers, FAMILIES[family].pipeline)
    return pipeline_class(**parts)
