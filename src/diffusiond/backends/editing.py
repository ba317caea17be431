"""Image-to-image and inpainting: the inputs prepared for diffusers, the pipeline class, and
the paste-back that keeps unmasked pixels exact.

Kept apart from diffusers_backend.py: the text-to-image path stays as it was, and a job
with `spec.edit` goes through `prepare_edit` -> `edit_pipeline` -> `paste_back` around the
same encode, diffuse and decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image as PILImage
from PIL import ImageFilter

from diffusiond.backends.shared_pipeline import share_pipeline
from diffusiond.images_in import read_image

if TYPE_CHECKING:
    from PIL.Image import Image

    from diffusiond.backends.base import ImageSpec
    from diffusiond.jobs.models import InputImage

# A UNet with this many input channels is a dedicated inpainting model: 4 of noisy
# latents, 1 of mask, 4 of the masked image's latents.
INPAINTING_UNET_CHANNELS = 9
# Crop instead of stretching when the output is at most this much smaller each way: the
# kept pixels then stay bit-exact (the size was only rounded down to a multiple of 8).
CROP_SLACK = 8


def steps_run(steps: int, strength: float) -> int:
    """The diffusion steps an edit at `strength` runs: diffusers' int(steps x strength), >= 1."""
    return max(1, min(steps, int(steps * strength)))


def pipeline_strength(steps: int, run: int) -> float:
    """A strength diffusers turns into exactly `run` of `steps` steps (no float slip)."""
    return min(1.0, (run + 0.5) / steps)


@dataclass(frozen=True)
class PreparedEdit:
    """One image's edit, ready for diffusers: pictures at the output size."""

    init: Image  # RGB
    mask: Image | None  # L, feathered; None: image-to-image (the whole picture is redrawn)
    steps_run: int
    strength: float  # as passed to diffusers, see `pipeline_strength`
    inpaint: bool  # through an inpainting pipeline (a mask, or a 9-channel UNet)

    def call_kwargs(self, width: int, height: int) -> dict[str, Any]:
        """The pipeline call's image arguments (they replace txt2img's width and height)."""
        kwargs: dict[str, Any] = {"image": self.init, "strength": self.strength}
        if self.inpaint:
            full = PILImage.new("L", self.init.size, 255)
            kwargs |= {"mask_image": self.mask or full, "width": width, "height": height}
        return kwargs


def fit(picture: Image, width: int, height: int) -> Image:
    """`picture` at width x height: cropped at the right and bottom when it is the size
    rounded down to a multiple of 8, else stretched with Lanczos (A1111's "just resize")."""
    if picture.size == (width, height):
        return picture
    over_w, over_h = picture.width - width, picture.height - height
    if 0 <= over_w < CROP_SLACK and 0 <= over_h < CROP_SLACK:
        return picture.crop((0, 0, width, height))
    return picture.resize((width, height), PILImage.Resampling.LANCZOS)


def mask_levels(picture: Image) -> Image:
    """The redraw mask (L, 255 = redraw): the alpha of a mask with transparency, else its
    brightness."""
    if picture.mode == "RGBA":
        alpha = picture.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return picture.convert("L")


def feather(mask: Image, radius: int) -> Image:
    """The mask's edge spread over about `radius` pixels (a Gaussian blur)."""
    if radius <= 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur(radius))


def _decoded(image: InputImage, mode: Literal["RGB", "RGBA"]) -> Image:
    # Checked when the request was parsed; read again here, as a broker worker gets bytes.
    # In RGB, transparent parts are laid on white by the guarded reader.
    return read_image(image.data, max_pixels=image.width * image.height, mode=mode)


def prepare_edit(spec: ImageSpec, *, inpainting_unet: bool) -> PreparedEdit | None:
    """The edit of `spec` for diffusers; None for plain text-to-image on a regular model.

    A dedicated inpainting model (`inpainting_unet`) draws every request through its
    inpainting pipeline: text-to-image as a full mask over a grey picture at strength 1.
    """
    edit = spec.edit
    if edit is None:
        if not inpainting_unet:
            return None
        grey = PILImage.new("RGB", (spec.width, spec.height), (127, 127, 127))
        return PreparedEdit(grey, None, spec.steps, 1.0, inpaint=True)
    init = fit(_decoded(edit.init, "RGB"), spec.width, spec.height)
    mask = None
    if edit.mask is not None:
        levels = mask_levels(_decoded(edit.mask, "RGBA"))
        mask = feather(fit(levels, spec.width, spec.height), edit.mask_blur)
    run = steps_run(spec.steps, edit.strength)
    return PreparedEdit(
        init=init,
        mask=mask,
        steps_run=run,
        strength=pipeline_strength(spec.steps, run),
        inpaint=mask is not None or inpainting_unet,
    )


def paste_back(result: Image, edit: PreparedEdit) -> Image:
    """The result over the init image with the feathered mask as its alpha: where the mask
    is 0 the init image's pixels come back exactly (the VAE's round trip never touches them)."""
    if edit.mask is None:
        return result
    return PILImage.composite(result.convert("RGB"), edit.init, edit.mask)


_CLASSES = {
    # (architecture is SDXL, inpainting pipeline) -> diffusers class name
    (False, False): "StableDiffusionImg2ImgPipeline",
    (False, True): "StableDiffusionInpaintPipeline",
    (True, False): "StableDiffusionXLImg2ImgPipeline",
    (True, True): "StableDiffusionXLInpaintPipeline",
}


def edit_pipeline(base: Any, architecture: str, edit: PreparedEdit, scheduler: Any) -> Any:
    """A pipeline for `edit` over the loaded one's modules (no second copy of the weights),
    with its own fresh scheduler."""
    import diffusers

    class_name = _CLASSES[(architecture == "sdxl", edit.inpaint)]
    pipeline_class = getattr(diffusers, class_name)
    pipeline = share_pipeline(pipeline_class, base, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def is_inpainting_unet(pipeline: Any) -> bool:
    return int(pipeline.unet.config.in_channels) == INPAINTING_UNET_CHANNELS
