"""The published sizes of each flow-matching family's modules, as builders (see
bench/family_memory.py, which counts them on the meta device and measures the small ones).

Each builder makes a module with the class diffusers or transformers loads it with and the
sizes of the model's config.json on the Hugging Face Hub (read through the diffusers docs
and copies of the configs); a `Part.note` says where a size is an assumption instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Builder = Callable[[], Any]


def _clip_l(projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _clip_g() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config)


def _t5_xxl() -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config)


def _qwen3(hidden: int, intermediate: int, tied: bool, causal_lm: bool) -> Builder:
    def build() -> Any:
        from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

        config = Qwen3Config(
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=tied,
        )
        return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)

    return build


def _qwen25_vl_7b() -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    }
    # config.json names only hidden_size 1280 of the vision tower; the rest are
    # transformers' defaults for Qwen2.5-VL (depth 32, 16 heads, 3420 wide, out 3584).
    vision = {"hidden_size": 1280, "out_hidden_size": 3584}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=152064)
    config.tie_word_embeddings = False
    return Qwen2_5_VLForConditionalGeneration(config)


def _diffusers(class_name: str, **config: Any) -> Builder:
    def build() -> Any:
        import diffusers

        return getattr(diffusers, class_name)(**config)

    return build


FLUX_VAE = _diffusers(
    "AutoencoderKL",
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD3_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16}
SD35_MEDIUM = _diffusers(
    "SD3Transformer2DModel",
    **SD3_TRANSFORMER,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX2 = {"patch_size": 1, "in_channels": 128, "mlp_ratio": 3.0, "guidance_embeds": False}
FLUX1_LIKE = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128}


@dataclass(frozen=True)
class Part:
    role: str
    build: Builder
    note: str = ""  # where a size is an assumption


FAMILIES: dict[str, tuple[Part, ...]] = {
    "FLUX.1 dev": (
        Part("transformer", _diffusers("FluxTransformer2DModel", guidance_embeds=True)),
        Part("text_encoder (CLIP-L)", lambda: _clip_l(projection=False)),
        Part("text_encoder_2 (T5-XXL)", _t5_xxl),
        Part("vae", FLUX_VAE),
    ),
    "FLUX.2 klein 4B": (
        Part(
            "transformer",
            _diffusers(
                "Flux2Transformer2DModel",
                **FLUX2,
                num_layers=5,
                num_single_layers=20,
                num_attention_heads=24,
                joint_attention_dim=7680,
            ),
        ),
        Part("text_encoder (Qwen3-4B)", _qwen3(2560, 9728, tied=True, causal_lm=True)),
        Part("vae", _diffusers("AutoencoderKLFlux2"), "assumed: diffusers' class defaults"),
    ),
    "FLUX.2 klein 9B": (
        Part(
            "transformer",
            _diffusers(
                "Flux2Transformer2DModel",
                **FLUX2,
                num_layers=8,
                num_single_layers=24,
                num_attention_heads=32,
                joint_attention_dim=12288,
            ),
            "assumed: 8 + 24 blocks, 32 heads (a third-party preset, not the config.json)",
        ),
        Part("text_encoder (Qwen3-8B)", _qwen3(4096, 12288, tied=False, causal_lm=True)),
        Part("vae", _diffusers("AutoencoderKLFlux2"), "assumed: diffusers' class defaults"),
    ),
    "SD 3.5 medium": (
        Part("transformer", SD35_MEDIUM),
        Part("text_encoder (CLIP-L)", lambda: _clip_l(projection=True)),
        Part("text_encoder_2 (CLIP-G)", _clip_g),
        Part("text_encoder_3 (T5-XXL)", _t5_xxl),
        Part("vae", FLUX_VAE),
    ),
    "SD 3.5 large": (
        Part(
            "transformer",
            _diffusers(
                "SD3Transformer2DModel",
                **SD3_TRANSFORMER,
                num_layers=38,
                attention_head_dim=64,
                num_attention_heads=38,
                joint_attention_dim=4096,
                caption_projection_dim=2432,
                pooled_projection_dim=2048,
                pos_embed_max_size=192,
                qk_norm="rms_norm",
            ),
        ),
        Part("text_encoder (CLIP-L)", lambda: _clip_l(projection=True)),
        Part("text_encoder_2 (CLIP-G)", _clip_g),
        Part("text_encoder_3 (T5-XXL)", _t5_xxl),
        Part("vae", FLUX_VAE),
    ),
    "Z-Image turbo": (
        Part(
            "transformer",
            _diffusers(
                "ZImageTransformer2DModel",
                dim=3840,
                n_layers=30,
                n_refiner_layers=2,
                n_heads=30,
                n_kv_heads=30,
                cap_feat_dim=2560,
                axes_lens=[1536, 512, 512],
            ),
        ),
        Part("text_encoder (Qwen3-4B)", _qwen3(2560, 9728, tied=True, causal_lm=False)),
        Part("vae", FLUX_VAE),
    ),
    "Qwen-Image": (
        Part("transformer", _diffusers("QwenImageTransformer2DModel")),
        Part("text_encoder (Qwen2.5-VL-7B)", _qwen25_vl_7b, "vision tower: see _qwen25_vl_7b"),
        Part("vae", _diffusers("AutoencoderKLQwenImage"), "assumed: diffusers' class defaults"),
    ),
    "Chroma1-HD": (
        Part("transformer", _diffusers("ChromaTransformer2DModel", **FLUX1_LIKE)),
        Part("text_encoder (T5-XXL)", _t5_xxl),
        Part("vae", FLUX_VAE),
    ),
}
