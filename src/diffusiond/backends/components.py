"""Models given as separate files by role, as stable-diffusion.cpp and the seed system name
them: `diffusion_model`, `vae`, `clip_l`, `clip_g`, `t5xxl`, `llm`. Pure data, no torch.

Two ways in, one `ComponentFiles`:
- the flags `--diffusion-model`, `--vae`, `--clip-l`, `--clip-g`, `--t5xxl`, `--llm` make the
  server's default model (`components_from_files`);
- a folder of the models dir holding a manifest, `components.json`, is a model whose id is
  the folder's name (`read_manifest`), so a request's `model` can name it:

      {"family": "flux1",                 (optional: read from the diffusion model's tensors)
       "diffusion_model": "flux1-schnell-Q8_0.gguf",
       "vae": "ae.safetensors",
       "clip_l": "clip_l.safetensors",
       "t5xxl": "t5xxl-Q8_0.gguf",
       "tokenizers": "tokenizers"}        (optional: see below)

  Paths are relative to the manifest's folder (or absolute). Each file may be .safetensors
  or .gguf.

The family comes from the diffusion model's tensor names (`detect_family`, the keys diffusers'
own single-file loader tells the families apart by), or from the manifest's `family`. Which
roles a family needs is its table's (families.py): the diffusion model, the VAE and its text
encoders.

A text encoder's file rarely carries its tokenizer. CLIP's vocabulary ships in this package;
a GGUF text encoder (t5xxl, llm) carries its tokenizer in its metadata, as llama.cpp writes
it. A .safetensors T5 or LLM has none: `tokenizers` names a folder holding a Hugging Face
tokenizer folder per role (`tokenizers/t5xxl/`, `tokenizers/llm/`), and without one such a
model is refused naming the role. A role's folder there wins over the file's own tokenizer
and over the shipped CLIP one (`tokenizers/clip_l/` too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from diffusiond.backends.families import FAMILIES
from diffusiond.errors import ModelLoadError

ROLES = ("diffusion_model", "vae", "clip_l", "clip_g", "t5xxl", "llm")
MANIFEST_NAME = "components.json"
COMPONENT_SUFFIXES = (".safetensors", ".gguf")
TOKENIZERS_KEY = "tokenizers"
_MANIFEST_LIMIT = 64 * 1024
_HEADER_LIMIT = 100_000_000
COMFY_PREFIX = "model.diffusion_model."

# The tensor that tells each family's diffusion model apart, in its original names (a
# ComfyUI file prefixes them with model.diffusion_model.). Checked in this order: FLUX.2
# and Chroma share FLUX.1's double/single blocks, so they come first.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flux2", ("single_stream_modulation.lin.weight",)),
    (
        "chroma",
        ("distilled_guidance_layer.in_proj.bias", "distilled_guidance_layer.in_proj.weight"),
    ),
    ("flux1", ("double_blocks.0.img_attn.norm.key_norm.scale",)),
    ("sd3", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",)),
    ("zimage", ("cap_pad_token", "x_pad_token")),
    ("qwenimage", ("txt_norm.weight",)),
)


@dataclass(frozen=True)
class ComponentFiles:
    """One model's files by role, its family, and where tokenizers come from."""

    family: str  # a key of families.FAMILIES
    files: Mapping[str, Path]  # role -> file
    tokenizers: Path | None = None  # a folder of tokenizer folders by role
    source: Path | None = None  # the manifest it was read from; None: the flags
    names: Mapping[str, str] = field(default_factory=dict)  # role -> file name, for listings
    # role -> the prefix of its tensors in its file: a single file holding several parts
    # (a ComfyUI checkpoint) gives each role the same path and its own prefix
    prefixes: Mapping[str, str] = field(default_factory=dict)

    def required_roles(self) -> tuple[str, ...]:
        return required_roles(self.family)


def required_roles(family: str) -> tuple[str, ...]:
    """The roles a family's model needs: diffusion model, VAE, then its text encoders."""
    return ("diffusion_model", "vae", *FAMILIES[family].text_encoders)


def detect_family(keys: Iterable[str]) -> str | None:
    """The family of a diffusion model from its tensor names; None when none matches."""
    names = {key.removeprefix(COMFY_PREFIX) for key in keys}
    for family, signature in _SIGNATURES:
        if any(key in names for key in signature):
            return family
    return None


def tensor_names(path: Path) -> frozenset[str]:
    """The tensor names of a .safetensors or .gguf file, from its header (no weights read)."""
    if path.suffix.lower() == ".gguf":
        from gguf import GGUFReader  # numpy only: the catalog runs without torch

        try:
            reader = GGUFReader(str(path), "r")
        except Exception as exc:  # the gguf package raises bare ValueErrors and worse
            raise ValueError(f"not a readable GGUF file: {exc}") from None
        return frozenset(tensor.name for tensor in reader.tensors)
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        if not 0 < size <= min(_HEADER_LIMIT, path.stat().st_size):
            raise ValueError(f"header length {size} is impossible for this file")
        header = json.loads(file.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return frozenset(key for key in header if key != "__metadata__")


def components_from_files(
    files: Mapping[str, Path | None],
    *,
    family: str | None = None,
    tokenizers: Path | None = None,
    source: Path | None = None,
    what: str = "--diffusion-model",
) -> ComponentFiles:
    """Checked components: every file exists and has a usable suffix, the family is known
    (given, or detected from the diffusion model), and every role it needs is there.
    A ModelLoadError names `what` (the flag or the manifest) and the role at fault."""
    given = {role: path for role, path in files.items() if path is not None}
    _check_files(given, what)
    diffusion = given.get("diffusion_model")
    if diffusion is None:
        raise ModelLoadError(f"{what}: a diffusion_model file is required")
    if family is None:
        family = _detected_family(diffusion, what)
    elif family not in FAMILIES:
        raise ModelLoadError(f"{what}: family {family!r} is none of {', '.join(FAMILIES)}")
    needed = required_roles(family)
    missing = [role for role in needed if role not in given]
    if missing:
        raise ModelLoadError(
            f"{what}: {FAMILIES[family].title} needs {', '.join(needed)}; "
            f"{', '.join(missing)} not given"
        )
    extra = [role for role in given if role not in needed]
    if extra:
        raise ModelLoadError(
            f"{what}: {FAMILIES[family].title} takes no {', '.join(extra)} "
            f"(it takes {', '.join(needed)})"
        )
    if tokenizers is not None and not tokenizers.is_dir():
        raise ModelLoadError(f"{what}: tokenizers folder {tokenizers} does not exist")
    ordered = {role: given[role] for role in needed}
    return ComponentFiles(
        family=family,
        files=ordered,
        tokenizers=tokenizers,
        source=source,
        names={role: path.name for role, path in ordered.items()},
    )


def _check_files(given: Mapping[str, Path], what: str) -> None:
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ModelLoadError(f"{what}: unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    for role, path in given.items():
        if path.suffix.lower() not in COMPONENT_SUFFIXES:
            raise ModelLoadError(f"{what}: {role} {path} must be a .safetensors or .gguf file")
        if not path.is_file():
            raise ModelLoadError(f"{what}: {role} file {path} does not exist")


def _detected_family(diffusion: Path, what: str) -> str:
    try:
        keys = tensor_names(diffusion)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: diffusion_model {diffusion} cannot be read: {exc}") from None
    family = detect_family(keys)
    if family is None:
        raise ModelLoadError(
            f"{what}: the family of {diffusion.name} is not one this server draws "
            f'({", ".join(FAMILIES)}) by its tensor names; name it with "family" in '
            f"a {MANIFEST_NAME}"
        )
    return family


def read_manifest(folder: Path) -> ComponentFiles:
    """The components a model folder's components.json names, checked; a ModelLoadError
    naming the manifest and the field otherwise."""
    manifest = folder / MANIFEST_NAME
    what = str(manifest)
    try:
        if manifest.stat().st_size > _MANIFEST_LIMIT:
            raise ModelLoadError(f"{what}: larger than {_MANIFEST_LIMIT} bytes")
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} must hold a JSON object")
    allowed = {*ROLES, "family", TOKENIZERS_KEY}
    for key, value in data.items():
        if key not in allowed:
            raise ModelLoadError(
                f"{what}: unknown field {key!r} (fields: {', '.join(sorted(allowed))})"
            )
        if not isinstance(value, str) or not value.strip():
            raise ModelLoadError(f"{what}: {key} must be a non-empty string")

    def resolve(name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else folder / path

    files = {role: resolve(data[role]) for role in ROLES if role in data}
    tokenizers = resolve(data[TOKENIZERS_KEY]) if TOKENIZERS_KEY in data else None
    return components_from_files(
        files, family=data.get("family"), tokenizers=tokenizers, source=manifest, what=what
    )


# Where a single-file checkpoint keeps each part, as ComfyUI saves them (and Stability's
# SD 3.5 files with their text encoders): the first prefix found wins.
_SINGLE_FILE_PREFIXES: Mapping[str, tuple[str, ...]] = {
    "diffusion_model": (COMFY_PREFIX,),
    "vae": ("first_stage_model.", "vae."),
    "clip_l": ("text_encoders.clip_l.transformer.",),
    "clip_g": ("text_encoders.clip_g.transformer.",),
    "t5xxl": ("text_encoders.t5xxl.transformer.",),
    "llm": (
        "text_encoders.qwen3_4b.transformer.",
        "text_encoders.qwen3_8b.transformer.",
        "text_encoders.qwen25_7b.transformer.",
    ),
}


def single_file_components(
    path: Path, family: str, keys: Iterable[str], *, tokenizers: Path | None = None
) -> ComponentFiles:
    """A flow family's single-file checkpoint as components of one file, each role under
    its prefix; a ModelLoadError naming the file and the parts it lacks (a file of the
    diffusion model alone needs the others given as split components)."""
    names = frozenset(keys)
    roles = required_roles(family)
    prefixes: dict[str, str] = {}
    for role in roles:
        found = [p for p in _SINGLE_FILE_PREFIXES[role] if any(n.startswith(p) for n in names)]
        if found:
            prefixes[role] = found[0]
    if "diffusion_model" not in prefixes:  # no ComfyUI prefix: the file is the model alone
        prefixes = {"diffusion_model": ""}
    missing = [role for role in roles if role not in prefixes]
    if missing:
        raise ModelLoadError(
            f"model file {path} holds a {FAMILIES[family].title} diffusion model without "
            f"its {', '.join(missing)}: give them as split components (a folder with a "
            f"{MANIFEST_NAME}, or --diffusion-model with --vae and the text encoders)"
        )
    return ComponentFiles(
        family=family,
        files=dict.fromkeys(roles, path),
        tokenizers=tokenizers,
        names=dict.fromkeys(roles, path.name),
        prefixes=prefixes,
    )
