"""Single-file Stable Diffusion checkpoints (`.safetensors`, `.ckpt`, `.gguf`), loaded offline.

A checkpoint in the original CompVis/ldm layout holds the weights only. The architecture is
read from its keys; the model configs for it ship inside this package (`configs/`), and so
does the CLIP tokenizer's byte-pair encoding, so loading never reaches for the network.

Each component is read from the file on its own, straight into the target dtype, converted
by diffusers' `from_single_file` and built; the whole checkpoint is never held in memory at
once, and no float32 copy of a half-precision model is ever made.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends.gguf_file import GGUF_SUFFIX, GgufFile, open_gguf
from diffusiond.errors import ModelLoadError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", GGUF_SUFFIX)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextEncoderPart:
    component: str  # the pipeline's name for it: text_encoder, text_encoder_2
    prefix: str  # its keys' prefix in the checkpoint
    pad_token: str  # OpenAI's CLIP pads with <|endoftext|>, OpenCLIP's with "!"


@dataclass(frozen=True)
class Architecture:
    name: str  # what /health reports: sd1, sd2, sdxl
    text_encoders: tuple[TextEncoderPart, ...]


ARCHITECTURES = {
    "sd1": Architecture(
        "sd1", (TextEncoderPart("text_encoder", "cond_stage_model.transformer.", "<|endoftext|>"),)
    ),
    "sd2": Architecture("sd2", (TextEncoderPart("text_encoder", "cond_stage_model.model.", "!"),)),
    "sdxl": Architecture(
        "sdxl",
        (
            TextEncoderPart(
                "text_encoder", "conditioner.embedders.0.transformer.", "<|endoftext|>"
            ),
            TextEncoderPart("text_encoder_2", "conditioner.embedders.1.model.", "!"),
        ),
    ),
}


def shipped_config(architecture: str) -> Path:
    """The packaged diffusers config folder (no weights) for an architecture."""
    return Path(str(resources.files("diffusiond.backends") / "configs" / architecture))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    # fp8 files (e.g. qwen_image_fp8_e4m3fn) are cast up to the compute dtype as they are read
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A .safetensors file read tensor by tensor with plain reads, never memory-mapped.

    A memory-mapped file's pages count in the process's RSS once touched, and stay until
    it is unmapped: loading a 2 GB checkpoint through a mapping costs 2 GB of peak RSS on
    top of the model it fills. Read into ordinary memory, each tensor is converted to the
    target dtype and the file's bytes are let go at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as file:
            head = file.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            size = int.from_bytes(head, "little")
            if size > 100_000_000 or size > path.stat().st_size:
                raise ValueError(f"header length {size} is impossible for this file")
            header = json.loads(file.read(size))
        self._base = 8 + size
        header.pop("__metadata__", None)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_of_file = path.stat().st_size - self._base
        for key, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key} has the unsupported dtype {entry['dtype']}")
            start, end = entry["data_offsets"]
            if end > end_of_file:
                raise ValueError(f"tensor {key} lies past the end of the file (truncated?)")
            self.entries[key] = (dtype, tuple(entry["shape"]), start, end)

    def read(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with self.path.open("rb", buffering=0) as file:
            for key in keys:
                stored, shape, start, end = self.entries[key]
                buffer = bytearray(end - start)
                file.seek(self._base + start)
                if file.readinto(buffer) != len(buffer):
                    raise ValueError(f"tensor {key} is cut short (truncated file?)")
                tensor = torch.frombuffer(buffer, dtype=stored) if buffer else torch.empty(0)
                tensor = tensor.reshape(shape)
                out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return out


def read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, floating-point ones in `dtype`."""
    file = SafetensorsFile(path)
    return file.read(list(file.entries), dtype)


class Checkpoint:
    """An open single-file checkpoint: its keys, and its tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: SafetensorsFile | None = None
        self._gguf: GgufFile | None = None
        self._state: dict[str, Any] | None = None
        try:
            if path.suffix.lower() == GGUF_SUFFIX:
                self._gguf = open_gguf(path, UNET_PREFIX)
                self.keys = frozenset(self._gguf.tensors)
            elif path.suffix == ".safetensors":
                self._file = SafetensorsFile(path)
                self.keys = frozenset(self._file.entries)
            else:
                self._state = _load_ckpt(path)
                self.keys = frozenset(self._state)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"model file {path} is not a readable {path.suffix} checkpoint "
                f"(corrupt or truncated?): {exc}"
            ) from exc

    def shape(self, key: str) -> tuple[int, ...]:
        if self._file is not None:
            return self._file.entries[key][1]
        if self._gguf is not None:
            return self._gguf.tensors[key].shape
        assert self._state is not None
        return tuple(self._state[key].shape)

    def tensors(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix`, in `dtype` (keys unchanged)."""
        keys = sorted(k for k in self.keys if k.startswith(prefix))
        try:
            if self._file is not None:
                return self._file.read(keys, dtype)
            if self._gguf is not None:
                return self._gguf.read(keys, dtype)
            assert self._state is not None
            return {
                key: self._state[key].to(dtype)
                if self._state[key].is_floating_point()
                else self._state[key]
                for key in keys
            }
        except Exception as exc:
            raise ModelLoadError(
                f"model file {self.path}: its tensors cannot be read (corrupt?): {exc}"
            ) from exc

    def close(self) -> None:
        self._file = None
        self._gguf = None
        self._state = None


def _load_ckpt(path: Path) -> dict[str, Any]:
    # weights_only: a .ckpt is a pickle, and a pickle may run code; only tensors are let in.
    loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"model file {path} holds a {type(loaded).__name__}, not weights")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


INPAINTING_CHANNELS = 9  # 4 noisy latents, the mask, 4 latents of the masked image
_FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
_INPAINTING_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline",
}


def unet_input_channels(checkpoint: Checkpoint) -> int:
    """4 for a text-to-image UNet, 9 for an inpainting one (4 when the key is absent)."""
    if _FIRST_CONV not in checkpoint.keys:
        return 4
    return int(checkpoint.shape(_FIRST_CONV)[1])


def detect_architecture(checkpoint: Checkpoint) -> Architecture:
    """SD 1.x, 2.x or SDXL, from the checkpoint's keys; a ModelLoadError naming the file if none."""
    keys = checkpoint.keys
    path = checkpoint.path

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if not has(UNET_PREFIX):
        raise ModelLoadError(
            f"model file {path} is not a Stable Diffusion checkpoint: it has no UNet weights "
            f"({UNET_PREFIX}*; is it a LoRA, a VAE or another kind of model?)"
        )
    channels = unet_input_channels(checkpoint)
    if channels not in (4, INPAINTING_CHANNELS):
        raise ModelLoadError(
            f"model file {path}: its UNet takes {channels} input channels; only text-to-image "
            f"(4 channels) and inpainting ({INPAINTING_CHANNELS}) models are supported, not "
            "upscaling or other ones"
        )
    if has("conditioner.embedders.1.model."):
        name = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise ModelLoadError(
            f"model file {path} is an SDXL refiner; only SDXL base models are supported"
        )
    elif has("cond_stage_model.model."):
        name = "sd2"
    elif has("cond_stage_model.transformer."):
        name = "sd1"
    else:
        raise ModelLoadError(
            f"model file {path}: unknown architecture: no text encoder weights that SD 1.x "
            "(cond_stage_model.transformer.*), SD 2.x (cond_stage_model.model.*) or SDXL "
            "(conditioner.embedders.*) have"
        )
    if not has(VAE_PREFIX):
        raise ModelLoadError(f"model file {path} has no VAE weights ({VAE_PREFIX}*)")
    return ARCHITECTURES[name]


@functools.cache
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, derived from the shipped byte-pair encoding (as CLIP does)."""
    from diffusiond.backends.builtin_model import _byte_symbols

    packed = resources.files("diffusiond.backends") / "configs" / "clip" / "merges.txt.gz"
    lines = gzip.decompress(packed.read_bytes()).decode("utf-8").splitlines()
    merges = tuple((left, right) for left, right in (line.split() for line in lines[1:] if line))
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols)]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str) -> Any:
    """The CLIP tokenizer of Stable Diffusion's text encoders (49,408 tokens), offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77
    )


def _tokenizer(config: Path, component: str, pad_token: str) -> Any:
    """The config folder's own tokenizer where it has one, else the shipped CLIP tokenizer."""
    if (config / component).is_dir():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(
            str(config), subfolder=component, local_files_only=True
        )
    return clip_tokenizer(pad_token)


def _check_loaded(path: Path, component: str, model: torch.nn.Module) -> None:
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ModelLoadError(
            f"model file {path}: the {component} weights are incomplete: {len(missing)} "
            f"missing (e.g. {shown}); is the file truncated, or not this architecture?"
        )


def load_single_file(
    path: Path, *, dtype: torch.dtype, config: Path | None = None
) -> tuple[Any, str]:
    """(pipeline, architecture name) for a single-file checkpoint, with no network access."""
    checkpoint = Checkpoint(path)
    try:
        architecture = detect_architecture(checkpoint)
        config = config or shipped_config(architecture.name)
        log.info("loading %s as %s with the configs in %s", path, architecture.name, config)
        return _assemble(checkpoint, architecture, config, dtype), architecture.name
    finally:
        checkpoint.close()


def _assemble(
    checkpoint: Checkpoint, architecture: Architecture, config: Path, dtype: torch.dtype
) -> Any:
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    try:
        index = json.loads((config / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model config {config} is unreadable: {exc}") from exc
    path = checkpoint.path
    components: dict[str, Any] = {}

    def build(component: str, load: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            model = load(*args, **kwargs)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"model file {path}: its {component} weights do not fit the "
                f"{architecture.name} configuration in {config / component}: {exc}"
            ) from exc
        _check_loaded(path, component, model)
        components[component] = model

    common = {"config": str(config), "torch_dtype": dtype, "local_files_only": True}
    channels = unet_input_channels(checkpoint)
    build(
        "unet",
        UNet2DConditionModel.from_single_file,
        checkpoint.tensors(UNET_PREFIX, dtype),
        subfolder="unet",
        in_channels=channels,  # the shipped configs say 4; an inpainting UNet takes 9
        **common,
    )
    build(
        "vae",
        AutoencoderKL.from_single_file,
        checkpoint.tensors(VAE_PREFIX, dtype),
        subfolder="vae",
        **common,
    )
    for part in architecture.text_encoders:
        class_name = index.get(part.component, [None, "CLIPTextModel"])[1]
        build(
            part.component,
            create_diffusers_clip_model_from_ldm,
            getattr(transformers, class_name),
            checkpoint=checkpoint.tensors(part.prefix, dtype),
            subfolder=part.component,
            **common,
        )
        tokenizer = part.component.replace("text_encoder", "tokenizer")
        components[tokenizer] = _tokenizer(config, tokenizer, part.pad_token)
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    components["scheduler"] = scheduler_class.from_pretrained(
        str(config), subfolder="scheduler", local_files_only=True
    )
    class_name = index["_class_name"]
    if channels == INPAINTING_CHANNELS:
        class_name = _INPAINTING_PIPELINES.get(class_name, class_name)
    pipeline_class = getattr(diffusers, class_name)
    extra: dict[str, Any] = {}
    if class_name in ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"):
        extra = {
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
    return pipeline_class(**components, **extra)
