"""GGUF checkpoints laid out as stable-diffusion.cpp's `convert` writes them.

sd.cpp keeps the checkpoint's original ldm names and no metadata, and converts a tensor to
the asked-for type only where ggml can hold it so: not biases, not the UNet's time and label
embeddings, not embedding tables, and only when a row (ggml's first dimension, torch's last)
is a whole number of the type's blocks; every other tensor keeps its stored type. A
`--tensor-type-rules` list (first matching pattern wins) picks another type for some names;
`rules` here is that list, so one file can mix types.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from tests.support.model_files import tiny_model_files

Q = GGMLQuantizationType
_KEPT_SUFFIXES = (".bias", ".scale", ".weight_scale")
_KEPT_PARTS = ("time_embed.", "label_emb.", "embedding")
_NUMPY_FLOATS = {Q.F32: np.float32, Q.F16: np.float16}

# One file with every type sd.cpp's --type offers for SD plus a K-quant, by tensor group.
MIXED_RULES: tuple[tuple[str, GGMLQuantizationType], ...] = (
    (r"^first_stage_model\.", Q.F16),
    (r"^cond_stage_model\..*\.mlp\.", Q.Q5_1),
    (r"^cond_stage_model\.", Q.Q5_0),
    (r"ff\.net\.2\.weight", Q.Q4_K),
    (r"attn2\.", Q.Q4_0),
    (r"attn1\.to_v\.", Q.Q4_1),
    (r"^model\.diffusion_model\.out\.", Q.BF16),
)


def sdcpp_type(
    name: str, stored: GGMLQuantizationType, wanted: GGMLQuantizationType
) -> GGMLQuantizationType:
    """The type sd.cpp gives a tensor when asked for `wanted` (its stored type if it may not)."""
    if name.endswith(_KEPT_SUFFIXES) or any(part in name for part in _KEPT_PARTS):
        return stored
    return wanted


def _encoded(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    if kind in _NUMPY_FLOATS:
        return values.astype(_NUMPY_FLOATS[kind])
    if kind == Q.Q4_K:
        return quantize_q4_k(values)
    return quantize(values, kind)


def write_sdcpp_gguf(
    state: Mapping[str, torch.Tensor],
    path: Path,
    wanted: GGMLQuantizationType,
    rules: Sequence[tuple[str, GGMLQuantizationType]] = (),
    *,
    quantize_vectors: bool = True,
) -> Counter[str]:
    """Write `state` (ldm names) as sd.cpp would; how many tensors got each type. sd.cpp
    quantizes 1-D weights too (norms); `quantize_vectors=False` keeps them as stored, for
    diffusers' GGUF loader, which cannot run a quantized norm."""
    writer = GGUFWriter(str(path), arch="unused")
    # sd.cpp writes tensors only; the writer's compulsory architecture entry is dropped
    writer.kv_data[0].pop("general.architecture")
    kinds: Counter[str] = Counter()
    for name, tensor in state.items():
        values = tensor.detach().float().contiguous().numpy()  # one tensor at a time
        target = next((kind for pattern, kind in rules if re.search(pattern, name)), wanted)
        stored = Q.F16 if tensor.dtype == torch.float16 else Q.F32
        kind = sdcpp_type(name, stored, target)
        unfit = values.ndim == 0 or values.shape[-1] % GGML_QUANT_SIZES[kind][0]
        if unfit or (values.ndim == 1 and not quantize_vectors):
            kind = stored
        kinds[kind.name] += 1
        writer.add_tensor(name, _encoded(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kinds


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks of `values` (rows a multiple of 256): per 256 values an f16 scale and
    minimum, eight 6-bit sub-block scales and minimums, and 4-bit codes (x = d*s*q - m*dm).
    The `gguf` package dequantizes this type but cannot quantize it."""
    blocks = values.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(blocks.min(axis=-1), 0.0)
    step = np.maximum((blocks.max(axis=-1) - low) / 15.0, 1e-12)
    scale = np.maximum(step.max(axis=-1, keepdims=True) / 63.0, 1e-12).astype(np.float16)
    floor = np.maximum((-low).max(axis=-1, keepdims=True) / 63.0, 1e-12).astype(np.float16)
    sub_scales = np.clip(np.rint(step / scale.astype(np.float32)), 1, 63).astype(np.uint8)
    sub_mins = np.clip(np.rint(-low / floor.astype(np.float32)), 0, 63).astype(np.uint8)
    offsets = (floor.astype(np.float32) * sub_mins)[..., None]
    steps = (scale.astype(np.float32) * sub_scales)[..., None]
    codes = np.clip(np.rint((blocks + offsets) / steps), 0, 15).astype(np.uint8)
    # scale bytes: 0-3 low 6 bits of scales 0-3 (top 2 bits: scales 4-7's high bits),
    # 4-7 the same for the minimums, 8-11 low nibbles of scales / minimums 4-7
    packed = np.zeros((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sub_scales[:, :4] & 0x3F) | ((sub_scales[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (sub_mins[:, :4] & 0x3F) | ((sub_mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sub_scales[:, 4:] & 0x0F) | ((sub_mins[:, 4:] & 0x0F) << 4)
    # codes: per 64 values, 32 bytes: the first 32 values' codes low, the next 32's high
    pairs = codes.reshape(-1, 4, 2, 32)
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate(
        [scale.view(np.uint8), floor.view(np.uint8), packed, nibbles], axis=-1
    ).astype(np.uint8)
    return out.reshape(*values.shape[:-1], values.shape[-1] // 256 * 144)


GGUF_VARIANTS: dict[str, tuple[GGMLQuantizationType, tuple[tuple[str, GGMLQuantizationType], ...]]]
GGUF_VARIANTS = {
    "f16": (Q.F16, ()),
    "q8_0": (Q.Q8_0, ()),
    "mixed": (Q.Q8_0, MIXED_RULES),
}


def tiny_gguf_file(home: Path, variant: str) -> tuple[Path, Path, Counter[str]]:
    """(diffusers folder, ldm .safetensors, and the GGUF `variant` of the same weights) of the
    built-in model, and how many tensors the GGUF holds of each type."""
    from safetensors.torch import load_file

    folder, single_file = tiny_model_files(home)
    wanted, rules = GGUF_VARIANTS[variant]
    path = home / f"tiny-sd1.{variant}.gguf"
    partial = path.with_suffix(".partial")
    kinds = write_sdcpp_gguf(load_file(str(single_file)), partial, wanted, rules)
    partial.replace(path)
    return folder, path, kinds
