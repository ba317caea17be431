"""The built-in model: a small Stable-Diffusion-shaped pipeline made from a fixed seed.

No weights can be downloaded and none ship in the package, so the default model is built
here: a UNet, a VAE with the usual 8x latent scale, a CLIP text encoder and a byte-level
CLIP tokenizer, all with weights drawn deterministically from `_WEIGHT_SEED`. It is saved
once in the diffusers folder format under the cache directory and then loaded with the same
`from_pretrained` path a real model takes. Its pictures are abstract: it was never trained.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the architecture or the weight recipe changes: a new folder is then built.
BUILTIN_MODEL_NAME = "diffusiond-builtin-v1"
_WEIGHT_SEED = 20241022
_TEXT_TOKENS = 77


def builtin_model_path(home: Path) -> Path:
    return home / "models" / BUILTIN_MODEL_NAME


def ensure_builtin_model(home: Path) -> Path:
    """The built-in model's folder, built first if it is not there yet."""
    target = builtin_model_path(home)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the built-in model in %s (once)", target)
    # Build beside the target and rename into place, so a half-written folder never loads
    # and two processes building at once both end with a whole model.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255 (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path, int]:
    """A byte-level vocabulary with no merges: every byte is a token, any text encodes."""
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file, len(tokens)


def _build(folder: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file, vocab_size = _write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=_TEXT_TOKENS)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=_TEXT_TOKENS,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
            )
        )
        # Three levels with attention only at the coarsest one keep a 512x512, 20-step
        # image near 1 s of diffusion on one CPU core.
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        # Four levels: three 2x upsamplings, the usual 8x between latents and pixels.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=512,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
