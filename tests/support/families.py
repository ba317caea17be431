"""Tiny random-weight models of the flow-matching families, saved as diffusers folders.

Each is the family's own pipeline with its own module classes, scaled down to a few hundred
thousand parameters (the transformers keep their family's head width, with one head, so the
rope axes, which no tensor records, are the published ones and the same weights load as
split component files too): text encoders from transformers configs, a transformer, a VAE with the
usual 8x latent scale, and tokenizers built here from handwritten vocabularies (nothing is
downloaded). Weights come from fixed seeds, so a folder is the same on every build. Their
pictures are noise: the point is to run each family's whole real pipeline.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAMILIES = ("flux1", "flux2", "sd3", "zimage", "qwenimage", "chroma")

# Chat markers the Qwen tokenizers know as single tokens.
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_T5_SPECIAL = ("<pad>", "</s>", "<unk>")
_T5_VOCAB = len(_T5_SPECIAL) + 1 + (127 - 32)  # the specials, the word marker, ASCII


def clip_tokenizer() -> Any:
    """A byte-level CLIP tokenizer with no merges (the built-in model's): 514 tokens."""
    import json

    from transformers import CLIPTokenizer

    from diffusiond.backends.builtin_model import _write_tokenizer_files

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file, _ = _write_tokenizer_files(Path(scratch))
        vocab = json.loads(vocab_file.read_text())
        del merges_file
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over printable ASCII, one token a character."""
    from transformers import T5TokenizerFast

    pieces = [(token, 0.0) for token in _T5_SPECIAL] + [("\u2581", -1.0)]
    pieces += [(chr(code), -2.0) for code in range(32, 127)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer with no merges and a small chat template."""
    from transformers import Qwen2Tokenizer

    from diffusiond.backends.builtin_model import _byte_symbols

    vocab = {symbol: index for index, symbol in enumerate(_byte_symbols())}
    for token in _QWEN_SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


QWEN_VOCAB = 256 + len(_QWEN_SPECIAL)


def _clip_text(with_projection: bool, hidden: int = 32, *, clip_g: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=1,  # CLIP's heads are 64 wide: a narrower model has one
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="gelu" if clip_g else "quick_gelu",  # OpenCLIP's bigG, OpenAI's L
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_T5_VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _qwen3(layers: int, causal_lm: bool) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rope_theta=1_000_000.0,  # Qwen3's published value
        bos_token_id=256,
        eos_token_id=258,
        pad_token_id=256,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def _vae(latent_channels: int, vae_class: Any = None, *, sd3: bool = False) -> Any:
    """An AutoencoderKL-shaped VAE: four levels, three 2x steps, the usual 8x scale."""
    from diffusers import AutoencoderKL

    scaling: dict[str, float] = {}
    if vae_class is None:  # the published latent scaling (the Flux2 VAE's is a batch norm)
        scaling = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's autoencoder
        if sd3:
            scaling = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
    return (vae_class or AutoencoderKL)(
        **scaling,
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _flux1() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,  # FLUX.1's own head width, so its rope axes apply
        num_attention_heads=1,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # shaped like FLUX.1 dev: guidance is an input of the model
        axes_dims_rope=(16, 56, 56),
    )
    return FluxPipeline(
        scheduler=Scheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_vae(16),
        text_encoder=_clip_text(with_projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


def _flux2() -> Any:
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler

    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=48,  # three of the text encoder's layers, 16 wide each
        timestep_guidance_channels=32,
        axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False,
    )
    return Flux2KleinPipeline(
        scheduler=Scheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_vae(32, AutoencoderKLFlux2),
        text_encoder=_qwen3(layers=28, causal_lm=True),  # the pipeline reads layers 9, 18, 27
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
        is_distilled=False,
    )


def _sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=64,
        num_attention_heads=1,
        caption_projection_dim=64,
        joint_attention_dim=64,  # the T5's width; CLIP L + G (32 + 32) are padded to it
        pooled_projection_dim=64,
        pos_embed_max_size=96,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=Scheduler(shift=3.0),
        vae=_vae(16, sd3=True),
        text_encoder=_clip_text(with_projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text(with_projection=True, clip_g=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(d_model=64),
        tokenizer_3=t5_tokenizer(),
    )


def _zimage() -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=128,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=1,
        n_kv_heads=1,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1024, 512, 512],
    )
    with torch.no_grad():  # made with torch.empty: give them values
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    return ZImagePipeline(
        scheduler=Scheduler(shift=3.0),
        vae=_vae(16),
        text_encoder=_qwen3(layers=2, causal_lm=False),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
    )


def _qwenimage() -> Any:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        # latents_mean/std: the class defaults, Qwen-Image's published values
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": QWEN_VOCAB,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,  # Qwen2.5-VL's heads are 128 wide, its mrope
            "num_key_value_heads": 1,  # sections [16, 24, 24]: scaled to one 16-wide head
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 1,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=QWEN_VOCAB,
        vision_start_token_id=QWEN_VOCAB,
        vision_end_token_id=QWEN_VOCAB,
        vision_token_id=QWEN_VOCAB,
    )
    from diffusiond.backends.component_pipeline import SCHEDULER_DEFAULTS

    return QwenImagePipeline(
        scheduler=Scheduler(**SCHEDULER_DEFAULTS["qwenimage"]),  # the published config
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
    )


def _chroma() -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler

    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=32,
        axes_dims_rope=(16, 56, 56),
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    return ChromaPipeline(
        scheduler=Scheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_vae(16),
        text_encoder=_t5(),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[], Any]] = {
    "flux1": _flux1,
    "flux2": _flux2,
    "sd3": _sd3,
    "zimage": _zimage,
    "qwenimage": _qwenimage,
    "chroma": _chroma,
}
_SEEDS = {family: 100 + index for index, family in enumerate(FAMILIES)}


def tiny_family_folder(home: Path, family: str) -> Path:
    """The diffusers folder of `family`'s tiny model, built under `home` the first time."""
    import torch

    folder = home / f"tiny-{family}"
    if (folder / "model_index.json").is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=home))
    try:
        # diffusers and transformers warn about their own internals while these are built
        # (a deprecated positional-embedding class, token ids of the real vocabularies);
        # pytest turns warnings into errors, and none of them is about the models made here.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(_SEEDS[family])
            _BUILDERS[family]().save_pretrained(str(staging), safe_serialization=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
