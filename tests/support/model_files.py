"""A tiny SD-shaped model in both forms: a diffusers folder and one ldm-layout file."""

from __future__ import annotations

from pathlib import Path

from diffusiond.backends.builtin_model import ensure_builtin_model


def tiny_model_files(home: Path) -> tuple[Path, Path]:
    """(diffusers folder, .safetensors in the CompVis/ldm layout) of the built-in model."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from diffusiond.backends.ldm_layout import pipeline_to_ldm

    folder = ensure_builtin_model(home)
    single_file = home / "tiny-sd1.safetensors"
    if not single_file.is_file():
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        save_file(pipeline_to_ldm(pipeline), str(single_file))
    return folder, single_file


def tiny_inpainting_model_files(home: Path) -> tuple[Path, Path]:
    """(diffusers folder, ldm-layout .safetensors) of a 9-channel inpainting model shaped
    like the built-in one: its UNet, made from a fixed seed, takes the noisy latents, the
    mask and the masked image's latents; the other modules are the built-in model's."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from diffusiond.backends.ldm_layout import pipeline_to_ldm

    folder = home / "tiny-inpainting"
    single_file = home / "tiny-inpainting.safetensors"
    if not folder.is_dir():
        base = StableDiffusionInpaintPipeline.from_pretrained(
            str(ensure_builtin_model(home)),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(9)
            unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
        pipeline = StableDiffusionInpaintPipeline(
            **{**base.components, "unet": unet}, requires_safety_checker=False
        )
        pipeline.save_pretrained(str(folder), safe_serialization=True)
        save_file(pipeline_to_ldm(pipeline), str(single_file))
    return folder, single_file


def tiny_sdxl_folder(home: Path) -> Path:
    """A diffusers folder of an SDXL-shaped model with random weights from a fixed seed
    (two text encoders, a text_time UNet), small enough for a unit test."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusiond.backends.single_file import clip_tokenizer

    folder = home / "tiny-sdxl"
    if folder.is_dir():
        return folder
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=80,  # 6 x 8 time ids + 32 pooled
            cross_attention_dim=64,  # the two encoders' 32 + 32
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
        )
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(text),
            text_encoder_2=CLIPTextModelWithProjection(text),
            tokenizer=clip_tokenizer("<|endoftext|>"),
            tokenizer_2=clip_tokenizer("!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
            ),
        )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder
