"""The one guarded reader for images that come from outside (issue 14, item 5)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from diffusiond.client import GeneratedImage, png_parameters
from diffusiond.images_in import ImageRejected, read_image
from tests.support.images import encoded, jpeg_rotated_by_exif, png_claiming

LIMIT = 4 * 1024 * 1024  # what the next issue uses for init images: IMAGE_MAX_PIXELS x 4


def test_a_header_declaring_ten_billion_pixels_is_refused_before_decoding() -> None:
    started = time.perf_counter()
    with pytest.raises(ImageRejected, match=r"100000x100000 .* over the limit of 4194304"):
        read_image(png_claiming(100_000, 100_000), max_pixels=LIMIT)
    assert time.perf_counter() - started < 1  # refused from the header, nothing decoded


def test_the_limit_is_ours_not_pillows() -> None:
    # 9 Mpx is far below Pillow's own bomb threshold (~89 Mpx): only our check refuses it.
    with pytest.raises(ImageRejected, match="3000x3000"):
        read_image(png_claiming(3000, 3000), max_pixels=LIMIT)
    with pytest.raises(ImageRejected, match="over the limit of 100"):
        read_image(encoded(Image.new("RGB", (11, 10)), "PNG"), max_pixels=100)


def test_a_truncated_png_is_a_clear_error() -> None:
    whole = encoded(Image.effect_noise((64, 64), 40).convert("RGB"), "PNG")
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        read_image(whole[: len(whole) // 2], max_pixels=LIMIT)


def test_a_text_file_is_not_an_image() -> None:
    with pytest.raises(ImageRejected, match="not a PNG, JPEG or WebP image"):
        read_image(b"a prompt, not a picture\n", max_pixels=LIMIT)
    with pytest.raises(ImageRejected, match="empty"):
        read_image(b"", max_pixels=LIMIT)


def test_a_gif_is_not_allowed() -> None:
    gif = encoded(Image.new("P", (8, 8)), "GIF")
    with pytest.raises(ImageRejected, match=r"GIF is not accepted.*PNG, JPEG or WebP"):
        read_image(gif, max_pixels=LIMIT)


def test_exif_orientation_is_applied() -> None:
    image = read_image(jpeg_rotated_by_exif(40, 20), max_pixels=LIMIT)
    assert image.size == (20, 40)  # turned upright
    top, bottom = image.getpixel((10, 3)), image.getpixel((10, 36))
    assert isinstance(top, tuple)
    assert isinstance(bottom, tuple)
    assert (top[0] > 200, top[2] < 60) == (True, True)  # the red half is on top now
    assert (bottom[0] < 60, bottom[2] > 200) == (True, True)


def test_rgba_is_kept_when_asked_and_flattened_on_white_otherwise() -> None:
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    clear.putpixel((0, 0), (200, 0, 0, 255))
    data = encoded(clear, "PNG")
    rgba = read_image(data, max_pixels=LIMIT, mode="RGBA")
    assert rgba.mode == "RGBA"
    assert rgba.getpixel((1, 1)) == (10, 20, 30, 0)
    rgb = read_image(data, max_pixels=LIMIT, mode="RGB")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (200, 0, 0)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)  # transparent becomes white, not black


def test_webp_and_jpeg_are_read() -> None:
    picture = Image.new("RGB", (16, 8), (0, 128, 0))
    for fmt in ("WEBP", "JPEG"):
        assert read_image(encoded(picture, fmt), max_pixels=LIMIT).size == (16, 8)


def test_png_parameters_refuses_a_bomb_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="100000x100000"):
        png_parameters(png_claiming(100_000, 100_000))


def test_pillows_bomb_warning_never_escapes(recwarn: pytest.WarningsRecorder) -> None:
    # 100 Mpx: over Pillow's warning threshold, under its error; we refuse it ourselves.
    with pytest.raises(ImageRejected):
        read_image(png_claiming(10_000, 10_000), max_pixels=200_000_000)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_the_client_decodes_a_servers_image_through_the_guarded_reader() -> None:
    ok = GeneratedImage(png=encoded(Image.new("RGB", (6, 4)), "PNG"), seed=1, width=6, height=4)
    assert ok.to_pil().size == (6, 4)
    bomb = GeneratedImage(png=png_claiming(100_000, 100_000), seed=1, width=1, height=1)
    with pytest.raises(ImageRejected, match="100000x100000"):
        bomb.to_pil()
