"""The web page's image editing (issue 16): an input image, a mask painted on it with the
mouse, strength and mask blur, "Use as input", in a real Chromium against real servers.

What the page sent is read from the requests themselves (page.on("request")): the mask is
checked pixel by pixel against the strokes the test drew."""

from __future__ import annotations

import base64
import io
import math
import random
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, FloatRect, Page, Request, expect

from tests.e2e.conftest import API_KEY, SMALL_MAX_BODY_BYTES
from tests.e2e.test_web import X, fill_form, open_page
from tests.support.server import ServerProcess, wait_idle

pytestmark = pytest.mark.e2e

GENERATIONS = "/v1/images/generations"
EDIT_FIELDS = ("initImage", "strength", "maskImage", "maskBlur")
BRUSH_PX = 24  # the page's default brush size, in pixels on screen
BLACK, WHITE = (0, 0, 0, 255), (255, 255, 255, 255)
EDGE = 2.0  # image pixels either side of a stroke's edge where the mask may go either way

Point = tuple[float, float]
Segment = tuple[Point, Point]


def input_png(width: int, height: int) -> bytes:
    """A gradient, so that an image-to-image result can differ from a text-to-image one."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)]
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """Random pixels: a PNG that does not compress, as big as its pixels."""
    image = Image.frombytes("RGB", (width, height), random.Random(16).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def record_posts(page: Page) -> list[dict[str, Any]]:
    """The JSON bodies of the generation requests the page sends, in order."""
    posts: list[dict[str, Any]] = []

    def record(request: Request) -> None:
        if request.method == "POST" and request.url.endswith(GENERATIONS):
            body = request.post_data_json
            assert isinstance(body, dict), f"the page sent {request.post_data!r}"
            posts.append(body)

    page.on("request", record)
    return posts


def generate(page: Page, posts: list[dict[str, Any]]) -> dict[str, Any]:
    """Press Generate, wait for the image, return the body that was sent."""
    sent = len(posts)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Complete: 1 image", timeout=60_000)
    assert len(posts) == sent + 1, "one request per Generate"
    return posts[-1]


class MaskCanvas:
    """The canvas on screen: drags given in fractions of it, kept in the image's pixels."""

    def __init__(self, page: Page, width: int) -> None:
        self.page = page
        self.width = width

    def box(self) -> FloatRect:
        """Where the canvas is now (a control used in between may have scrolled the page)."""
        canvas = self.page.locator("#mask-canvas")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        assert box is not None, "the mask canvas is not shown"
        return box

    def drag(self, start: Point, end: Point) -> Segment:
        box = self.box()
        self.page.mouse.move(
            box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"]
        )
        self.page.mouse.down()
        self.page.mouse.move(
            box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=12
        )
        self.page.mouse.up()
        scale = self.scale()
        return (
            (start[0] * box["width"] * scale, start[1] * box["height"] * scale),
            (end[0] * box["width"] * scale, end[1] * box["height"] * scale),
        )

    def scale(self) -> float:
        """Image pixels per pixel on screen."""
        return self.width / self.box()["width"]

    def radius(self, brush_px: int) -> float:
        return brush_px / 2 * self.scale()


def distance(point: Point, segment: Segment) -> float:
    (ax, ay), (bx, by) = segment
    px, py = point
    length2 = (bx - ax) ** 2 + (by - ay) ** 2
    along = ((px - ax) * (bx - ax) + (py - ay) * (by - ay)) / length2 if length2 else 0.0
    t = max(0.0, min(1.0, along))
    return math.hypot(px - (ax + t * (bx - ax)), py - (ay + t * (by - ay)))


def check_mask(
    mask_base64: str,
    size: tuple[int, int],
    painted: tuple[Segment, float],
    erased: tuple[Segment, float],
) -> None:
    """The mask is a PNG of SIZE, only black and white: white under the painted stroke
    (less the erased one), black elsewhere; pixels within EDGE of a stroke's edge are free."""
    mask = Image.open(io.BytesIO(base64.b64decode(mask_base64, validate=True)))
    assert mask.format == "PNG"
    assert mask.size == size
    pixels = mask.convert("RGBA").load()
    assert pixels is not None
    counts = {"white": 0, "black": 0}
    for y in range(size[1]):
        for x in range(size[0]):
            centre = (x + 0.5, y + 0.5)
            value = pixels[x, y]
            assert value in (BLACK, WHITE), f"({x}, {y}) is {value}, neither black nor white"
            paint = distance(centre, painted[0]) - painted[1]
            erase = distance(centre, erased[0]) - erased[1]
            if paint < -EDGE and erase > EDGE:
                assert value == WHITE, f"({x}, {y}) was painted but is black"
                counts["white"] += 1
            elif paint > EDGE or erase < -EDGE:
                assert value == BLACK, f"({x}, {y}) was not painted (or erased) but is white"
                counts["black"] += 1
    assert counts["white"] > 100, counts
    assert counts["black"] > 100, counts


def drop_file(page: Page, target: str, data: bytes, name: str, mime: str) -> None:
    """Drop a file on TARGET as a drag from the desktop would."""
    transfer = page.evaluate_handle(
        """([text, name, mime]) => {
          const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], name, { type: mime }));
          return transfer;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})


def test_paint_a_mask_and_generate(
    web_server: ServerProcess, page: Page, tmp_path: Path, output_dir: Path
) -> None:
    source = input_png(203, 150)
    path = tmp_path / "lighthouse.png"
    path.write_bytes(source)
    posts = record_posts(page)
    open_page(page, web_server)
    expect(page.get_by_label("Strength")).to_be_hidden()  # only with an input image

    page.get_by_label("Pick an input image").set_input_files(path)
    expect(page.locator("#input-caption")).to_have_text(f"lighthouse.png · 203 {X} 150")
    expect(page.get_by_label("Size", exact=True)).to_have_value("input")
    expect(page.get_by_label("Size", exact=True).locator("option:checked")).to_have_text(
        f"Input image's size (200 {X} 144)"
    )
    expect(page.get_by_label("Strength")).to_have_value("0.75")
    expect(page.get_by_label("Mask blur")).to_have_value("4")
    expect(page.locator("#mask-state")).to_contain_text("No mask")

    # A horizontal brush stroke, then a wider eraser stroke across its middle.
    canvas = MaskCanvas(page, 203)
    painted = canvas.drag((0.15, 0.5), (0.85, 0.5))
    expect(page.locator("#mask-state")).to_contain_text("Mask painted")
    page.get_by_label("Eraser (keep)").check()
    page.get_by_label("Brush diameter").fill("40")
    expect(page.locator("#brush-size-value")).to_have_text("40")
    erased = canvas.drag((0.5, 0.1), (0.5, 0.9))

    # Strength from the keyboard: three steps of 0.05 down.
    page.get_by_label("Strength").focus()
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#strength-value")).to_have_text("0.60")
    page.get_by_label("Mask blur").fill("9")
    fill_form(page, steps=2, seed=21)
    page.screenshot(path=output_dir / "web-page-edit.png", full_page=True)

    body = generate(page, posts)
    assert base64.b64decode(body["initImage"]) == source  # the file's own bytes
    assert body["strength"] == 0.6
    assert body["maskBlur"] == 9
    assert "width" not in body, "the input's size is the server's"
    assert "height" not in body
    check_mask(
        body["maskImage"],
        (203, 150),
        (painted, canvas.radius(BRUSH_PX)),
        (erased, canvas.radius(40)),
    )
    results = page.locator("#gallery .result")
    expect(results).to_have_count(1)
    expect(results.first.locator(".meta")).to_have_text(
        f"seed 21 · 200{X}144 · euler_a · inpaint, strength 0.6"
    )


def test_use_a_result_as_input_then_remove_it(web_server: ServerProcess, page: Page) -> None:
    posts = record_posts(page)
    open_page(page, web_server)
    fill_form(page, width=64, height=64, steps=2, seed=3)
    first = generate(page, posts)
    assert not set(EDIT_FIELDS) & set(first), first
    job_id = page.locator("#gallery .result").first.get_attribute("data-job")

    page.get_by_role("button", name="Use image 1 of 1, seed 3 as the input image").click()
    expect(page.locator("#input-caption")).to_have_text(f"{job_id}-1.png · 64 {X} 64")
    expect(page.get_by_label("Strength")).to_be_focused()
    expect(page.locator("#status")).to_contain_text("is the input image")
    page.get_by_label("Random seed").check()

    # Nothing painted: image-to-image of the whole picture, no mask and no mask blur.
    second = generate(page, posts)
    with web_server.client() as http:
        result_png = http.get(f"{GENERATIONS}/{job_id}/images/0").content
    assert base64.b64decode(second["initImage"]) == result_png
    assert second["strength"] == 0.75
    assert not {"maskImage", "maskBlur", "width", "height"} & set(second), second
    expect(page.locator("#gallery .result").first.locator(".meta")).to_contain_text(
        f"64{X}64 · euler_a · img2img, strength 0.75"
    )

    # Removed: a plain text-to-image request, at the size chosen before.
    page.get_by_role("button", name="Remove input image").click()
    expect(page.locator("#editor")).to_be_hidden()
    expect(page.get_by_label("Pick an input image")).to_be_focused()
    expect(page.get_by_label("Size", exact=True)).to_have_value("custom")
    third = generate(page, posts)
    assert not set(EDIT_FIELDS) & set(third), third
    assert (third["width"], third["height"]) == (64, 64)
    expect(page.locator("#gallery .result").first.locator(".meta")).to_have_text(
        re.compile(rf"^seed \d+ · 64{X}64 · euler_a$")
    )
    with web_server.client() as http:
        wait_idle(http)


def test_drop_an_image_and_refuse_what_is_not_one(web_server: ServerProcess, page: Page) -> None:
    posts = record_posts(page)
    open_page(page, web_server)
    drop_file(page, "#drop-zone", b"just some text", "notes.txt", "text/plain")
    expect(page.locator("#initImage-error")).to_have_text(
        "initImage must be a PNG, JPEG or WebP image"
    )
    expect(page.locator("#editor")).to_be_hidden()

    drop_file(page, "#drop-zone", input_png(96, 80), "dropped.png", "image/png")
    expect(page.locator("#input-caption")).to_have_text(f"dropped.png · 96 {X} 80")
    expect(page.locator("#initImage-error")).to_be_hidden()
    canvas = MaskCanvas(page, 96)
    canvas.drag((0.2, 0.3), (0.8, 0.7))
    outline = page.locator("#brush-outline")  # the brush's size, under the pointer
    expect(outline).to_be_visible()
    outline_box = outline.bounding_box()
    assert outline_box is not None
    assert (outline_box["width"], outline_box["height"]) == (BRUSH_PX, BRUSH_PX)
    page.get_by_role("button", name="Clear mask").click()
    expect(page.locator("#mask-state")).to_contain_text("No mask")
    expect(outline).to_be_hidden()

    # A new image dropped on the image itself takes its place, with a new mask.
    canvas.drag((0.2, 0.3), (0.8, 0.7))
    drop_file(page, "#mask-canvas", input_png(120, 72), "second.png", "image/png")
    expect(page.locator("#input-caption")).to_have_text(f"second.png · 120 {X} 72")
    expect(page.locator("#mask-state")).to_contain_text("No mask")

    fill_form(page, steps=2)
    body = generate(page, posts)
    assert "maskImage" not in body, "a cleared mask is no mask"
    expect(page.locator("#gallery .result .meta")).to_contain_text(f"120{X}72 · euler_a · img2img")


def test_input_image_errors_shown_next_to_the_field(
    locked_server: ServerProcess, page: Page, tmp_path: Path
) -> None:
    page.add_init_script(f"localStorage.setItem('diffusiond.apiKey', '{API_KEY}')")
    posts = record_posts(page)
    open_page(page, locked_server)
    fill_form(page, steps=2)

    # Too small to make an image at its own size: the page says so, nothing is sent.
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(input_png(40, 40))
    page.get_by_label("Pick an input image").set_input_files(tiny)
    expect(page.locator("#input-caption")).to_contain_text(f"40 {X} 40")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#initImage-error")).to_contain_text("width and height must be at least 64")
    expect(page.get_by_label("Replace the input image")).to_be_focused()
    assert posts == []

    # A mask blur out of range, with a mask painted: the page's rule, by the field.
    page.get_by_label("Size", exact=True).select_option("256x256")
    MaskCanvas(page, 40).drag((0.2, 0.5), (0.8, 0.5))
    page.get_by_label("Mask blur").fill("65")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#maskBlur-error")).to_have_text("maskBlur must be an integer from 0 to 64")
    expect(page.get_by_label("Mask blur")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Mask blur")).to_be_focused()
    assert posts == []
    page.get_by_label("Mask blur").fill("4")
    expect(page.locator("#maskBlur-error")).to_be_hidden()
    page.get_by_role("button", name="Clear mask").click()

    # More pixels than this server takes (4 x its budget): the server's 400, by the field.
    big = tmp_path / "big.png"
    big.write_bytes(input_png(520, 520))
    page.get_by_label("Replace the input image").set_input_files(big)
    expect(page.locator("#input-caption")).to_contain_text(f"520 {X} 520")
    page.get_by_label("Size", exact=True).select_option("256x256")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#initImage-error")).to_contain_text("initImage must be")
    expect(page.get_by_label("Replace the input image")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert len(posts) == 1
    assert (posts[0]["width"], posts[0]["height"]) == (256, 256)

    # A body over this server's limit: its 413, by the image that made it big.
    noisy = tmp_path / "noisy.png"
    noisy.write_bytes(noise_png(200, 200))
    assert len(noisy.read_bytes()) > SMALL_MAX_BODY_BYTES
    page.get_by_label("Replace the input image").set_input_files(noisy)
    expect(page.locator("#initImage-error")).to_be_hidden()  # a new image, a new start
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#initImage-error")).to_have_text(
        f"the request body is over {SMALL_MAX_BODY_BYTES} bytes, with the images in it: "
        "pick a smaller input image"
    )
    expect(page.get_by_label("Replace the input image")).to_be_focused()
    assert len(posts) == 2


def test_narrow_screen_with_an_input_image(
    web_server: ServerProcess, browser: Browser, tmp_path: Path, output_dir: Path
) -> None:
    path = tmp_path / "wide.png"
    path.write_bytes(input_png(640, 200))
    context = browser.new_context(viewport={"width": 360, "height": 740})
    try:
        page = context.new_page()
        open_page(page, web_server)
        page.get_by_label("Pick an input image").set_input_files(path)
        expect(page.locator("#editor")).to_be_visible()
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll("input, select, textarea")]
                 .filter(control => control.labels.length === 0).map(control => control.id)"""
        )
        assert unlabelled == [], f"controls without a label: {unlabelled}"
        box = page.locator("#mask-canvas").bounding_box()
        assert box is not None
        assert box["width"] <= 360
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 360, f"the page scrolls sideways at 360 px: {width} px wide"
        page.locator("#edit").screenshot(path=output_dir / "narrow-edit.png")

        # Every editing control from the keyboard: the tool, the sizes, Remove.
        page.get_by_label("Brush (paint: redraw)").focus()
        page.keyboard.press("ArrowDown")
        expect(page.get_by_label("Eraser (keep)")).to_be_checked()
        page.keyboard.press("Tab")
        expect(page.get_by_label("Brush diameter")).to_be_focused()
        page.keyboard.press("End")
        expect(page.locator("#brush-size-value")).to_have_text("128")
        page.keyboard.press("Tab")
        expect(page.get_by_role("button", name="Clear mask")).to_be_focused()
        page.keyboard.press("Tab")
        expect(page.get_by_role("button", name="Remove input image")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#editor")).to_be_hidden()
        expect(page.get_by_label("Size", exact=True)).to_have_value("512x512")
    finally:
        context.close()
    with httpx.Client(base_url=web_server.url) as http:
        wait_idle(http)
