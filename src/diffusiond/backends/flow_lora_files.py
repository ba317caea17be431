"""Which flow-matching family a LoRA file is for, from its tensor names and shapes alone.

Pure (no torch): lora_files.py lists and checks LoRAs on API nodes with it. The formats are
diffusers/peft (`transformer.<module>.lora_A.weight`) and kohya/ComfyUI
(`lora_unet_<module with underscores>.lora_down.weight`), the latter either in diffusers'
module names or in Black Forest Labs' (`double_blocks`, `single_blocks`: FLUX.1, FLUX.2,
Chroma). Module names are matched with `.` or `_` between their words. Each family has
layers no other family here has, and a LoRA trained on it nearly always touches some:

- Black Forest Labs' names: Chroma with its `distilled_guidance_layer`; FLUX.2 with its
  shared `*_stream_modulation`, or MLPs wider than FLUX.1's (a single block's `linear1`
  9x as wide out as in, FLUX.1's 7x; a double block's `img_mlp_0` 6x, FLUX.1's 4x); else
  FLUX.1. (These names have `img_mlp`/`txt_mod` too, so they are read first.)
- Z-Image: `layers.N.attention`, `noise_refiner`, `context_refiner`, `feed_forward`;
- Qwen-Image: `img_mlp`, `txt_mlp`, `img_mod`, `txt_mod`;
- FLUX.2: `to_qkv_mlp_proj`, `ff.linear_in`, `*_stream_modulation`;
- Chroma: `distilled_guidance_layer` (Chroma's own modulation network);
- FLUX.1: single-stream blocks (`single_transformer_blocks`);
- joint blocks (`transformer_blocks`) alone: SD 3.x where they are not 3072 or 6144 wide;
  Qwen-Image where 3072 wide and deeper than FLUX.1's 19; otherwise "unknown" (a FLUX.1
  LoRA of its double blocks only, or a Qwen-Image one of its first blocks, look the same),
  which the API does not check and the backend tries to load.

A Chroma model is a pruned FLUX.1 schnell: the same attention and MLP layers, so a FLUX.1
LoRA's are Chroma's too (lora_fits); one that reads as FLUX.1 applies to both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

Shapes = Mapping[str, tuple[int, ...]]

FLOW_PREFIXES = ("transformer.",)  # diffusers/peft keys of a flow model's transformer
FLUX1_WIDTH = 3072  # FLUX.1's, Chroma's, Qwen-Image's and FLUX.2 klein's hidden width
FLUX1_JOINT_BLOCKS = 19
WIDE_JOINT_WIDTHS = (FLUX1_WIDTH, 6144)  # not SD 3.x's (1536, 2432); 6144: FLUX.2 dev

_SEP = r"[._]"


def _words(*names: str) -> str:
    """A regex alternation of module names whose words may be joined by `.` or `_`."""
    return "|".join(name.replace(" ", _SEP) for name in names)


_CHROMA = re.compile(_words("distilled guidance layer"))
_STREAM_MODULATION = re.compile(_words("stream modulation"))
_MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "zimage",
        re.compile(
            rf"(^|{_SEP})({_words('noise refiner', 'context refiner', 'feed forward')}"
            rf"|layers{_SEP}\d+{_SEP}attention){_SEP}"
        ),
    ),
    (
        "qwenimage",
        re.compile(rf"(^|{_SEP})({_words('img mlp', 'txt mlp', 'img mod', 'txt mod')}){_SEP}"),
    ),
    (
        "flux2",
        re.compile(_words("to qkv mlp proj", "ff linear in", "ff context linear in")),
    ),
    ("flux2", _STREAM_MODULATION),
    ("chroma", _CHROMA),
)
_SINGLE_BLOCKS = re.compile(_words("single transformer blocks"))
_BFL_BLOCKS = re.compile(r"^lora_unet_(double|single)_blocks_\d+_")
_KOHYA_LINEAR1 = re.compile(r"^lora_unet_single_blocks_\d+_linear1\.lora_down\.weight$")
_KOHYA_IMG_MLP = re.compile(r"^lora_unet_double_blocks_\d+_img_mlp_0\.lora_down\.weight$")
_JOINT_BLOCKS = re.compile(rf"(^|{_SEP})transformer{_SEP}blocks{_SEP}(?P<index>\d+){_SEP}")
_SD_UNET = re.compile(
    r"^lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_"
)
_PAIR = re.compile(r"(lora_down|lora_A|lora_up|lora_B)\.weight$")
_DOWN = re.compile(r"(lora_down|lora_A)\.weight$")

# A model of the key's architecture takes LoRAs of these architectures too.
_ALSO_FITS = {"chroma": ("flux1",)}
# Families whose diffusers loader (0.42.1) does not convert kohya names: SD 3's loads such
# a file into no layer at all (measured). Every other flow family's converts them.
NO_KOHYA_LOADER = frozenset({"sd3"})


def flow_keys(shapes: Shapes) -> Shapes:
    """The LoRA pairs' tensors that name a flow transformer's modules: diffusers'
    `transformer.` ones and kohya's `lora_unet_` ones outside an SD UNet's blocks."""
    return {
        key: shape
        for key, shape in shapes.items()
        if _PAIR.search(key)
        and (
            key.startswith(FLOW_PREFIXES)
            or (key.startswith("lora_unet_") and not _SD_UNET.search(key))
        )
    }


def _widening(flow: Shapes, layer: re.Pattern[str]) -> float | None:
    """out/in of the first `layer` pair: its up's rows over its down's columns."""
    for key, down in flow.items():
        if layer.search(key):
            up = flow.get(key.replace("lora_down", "lora_up"), ())
            if len(up) >= 2 and len(down) >= 2 and down[1]:
                return up[0] / down[1]
    return None


def _bfl_family(flow: Shapes) -> str:
    """FLUX.1, FLUX.2 or Chroma, for a LoRA in Black Forest Labs' block names."""
    if any(_CHROMA.search(key) for key in flow):
        return "chroma"
    if any(_STREAM_MODULATION.search(key) for key in flow):
        return "flux2"
    linear1 = _widening(flow, _KOHYA_LINEAR1)
    mlp = _widening(flow, _KOHYA_IMG_MLP)
    if (linear1 is not None and linear1 > 8) or (mlp is not None and mlp > 5):
        return "flux2"
    return "flux1"


def _joint_only(flow: Shapes) -> str:
    """The family of a LoRA of joint (double-stream) blocks alone, from their width and
    count: FLUX.1 has 19 such blocks, Qwen-Image 60, both 3072 wide (so are FLUX.2 klein's
    first blocks: FLUX.2 dev is 6144); SD 3.x's are 1536 or 2432 wide, 24 or 38 of them."""
    width = None
    deepest = 0
    for key, shape in flow.items():
        block = _JOINT_BLOCKS.search(key)
        if block is None:
            continue
        deepest = max(deepest, int(block.group("index")))
        if width is None and _DOWN.search(key) and len(shape) >= 2:
            width = shape[1]
    if width not in WIDE_JOINT_WIDTHS:
        return "sd3"
    if width == FLUX1_WIDTH and deepest >= FLUX1_JOINT_BLOCKS:
        return "qwenimage"
    return "unknown"


def flow_lora_architecture(shapes: Shapes) -> str | None:
    """The flow family (families.py name) a LoRA is for; None: not a flow model's LoRA."""
    flow = flow_keys(shapes)
    if not flow:
        return None
    if any(_BFL_BLOCKS.search(key) for key in flow):
        return _bfl_family(flow)
    for family, marker in _MARKERS:
        if any(marker.search(key) for key in flow):
            return family
    if any(_SINGLE_BLOCKS.search(key) for key in flow):
        return "flux1"
    if not any(_JOINT_BLOCKS.search(key) for key in flow):
        return None
    return _joint_only(flow)


def lora_fits(lora_architecture: str, model_architecture: str) -> bool:
    """Whether a LoRA made for `lora_architecture` applies to a `model_architecture` model
    ("unknown" on either side: it is not known not to)."""
    if "unknown" in (lora_architecture, model_architecture):
        return True
    fits = (model_architecture, *_ALSO_FITS.get(model_architecture, ()))
    return lora_architecture in fits


def format_fits(lora_format: str, model_architecture: str) -> bool:
    """Whether the model's LoRA loader reads a file of `lora_format` ("kohya", "peft")."""
    return not (lora_format == "kohya" and model_architecture in NO_KOHYA_LOADER)
