"""Clip skip: the prompt read from an earlier layer of the CLIP text encoder.

SDXL goes through diffusers' own `encode_prompt(clip_skip=...)`. For SD 1.x/2.x that path
reaches for `text_encoder.text_model.final_layer_norm`, which transformers 5's
`CLIPTextModel` no longer has (its layers sit on the model itself), so `encode_skipping_layers`
does the same few steps: tokenize as diffusers does, take hidden state -(skip + 1), apply the
final layer norm.
"""

from __future__ import annotations

from typing import Any

from diffusiond.sampling import diffusers_clip_skip


def pipeline_clip_skip(pipeline: Any, clip_skip: int | None, sdxl: bool) -> int | None:
    """diffusers' clip_skip for a request's clipSkip, clamped to the pipeline's text
    encoders (SDXL's two are skipped alike, so the shallower one bounds it)."""
    encoders = [getattr(pipeline, name, None) for name in ("text_encoder", "text_encoder_2")]
    layers = min(int(e.config.num_hidden_layers) for e in encoders if e is not None)
    return diffusers_clip_skip(clip_skip, layers, sdxl=sdxl)


def encoded_at_layer(pipeline: Any, text: str, skip: int) -> Any:
    """One text's embeddings from hidden state -(skip + 1) of an SD text encoder, through
    its final layer norm; skip 0 is the encoder's ordinary output."""
    tokenizer = pipeline.tokenizer
    encoder = pipeline.text_encoder
    tokens = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = tokens.input_ids.to(encoder.device)
    # As diffusers: the attention mask only for encoders configured to take it.
    use_mask = getattr(encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(encoder.device) if use_mask else None
    hidden = encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    layers = getattr(encoder, "text_model", encoder)  # transformers 4 nests them
    return layers.final_layer_norm(hidden[-(skip + 1)]).to(encoder.dtype)


def encode_skipping_layers(
    pipeline: Any, prompt: str, negative: str | None, guided: bool, skip: int
) -> dict[str, Any]:
    """The SD pipeline call's embedding arguments with `skip` layers skipped."""
    embeds = encoded_at_layer(pipeline, prompt, skip)
    negative_embeds = encoded_at_layer(pipeline, negative or "", skip) if guided else None
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
