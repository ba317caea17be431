"""The web page at /, driven in a real headless Chromium against real servers."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, Route, expect

from tests.e2e.conftest import API_KEY, SMALL_MAX_PIXELS
from tests.support.server import REPO_ROOT, ServerProcess, wait_idle

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "web-page.png"
X = "\N{MULTIPLICATION SIGN}"  # the page writes sizes as 256 X 256, with this sign
JOB_URL = re.compile(r"/v1/images/generations/(gen_[A-Za-z0-9_]+)$")

# Records every change of the bar and of the preview, from inside the page, so that the test
# sees each state the page showed (not only the ones it happened to sample).
RECORD = """() => {
  window.__bar = [];
  window.__previews = 0;
  const bar = document.getElementById("bar");
  new MutationObserver(() => {
    window.__bar.push([Number(bar.getAttribute("aria-valuenow")),
                       document.getElementById("progress-text").textContent]);
  }).observe(bar, {attributes: true, attributeFilter: ["aria-valuenow", "aria-valuetext"]});
  new MutationObserver(() => { window.__previews += 1; })
    .observe(document.getElementById("preview-image"), {attributeFilter: ["src"]});
}"""


def open_page(page: Page, server: ServerProcess) -> None:
    page.goto(server.url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#server-info")).to_contain_text("diffusiond-builtin")


def fill_form(
    page: Page,
    *,
    prompt: str = "a lighthouse at dusk",
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    count: int | None = None,
    seed: int | None = None,
    sampler: str | None = None,
) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in (("Width", width), ("Height", height), ("Steps", steps)):
        if value is not None:
            page.get_by_label(label).fill(str(value))
    if count is not None:
        page.get_by_label("Images").fill(str(count))
    if sampler is not None:
        page.get_by_label("Sampler").select_option(sampler)
    if seed is not None:
        page.get_by_label("Random seed").uncheck()
        page.get_by_label("Seed", exact=True).fill(str(seed))


def test_generate_two_images_watch_them_and_keep_one(
    web_server: ServerProcess, page: Page, output_dir: Path
) -> None:
    open_page(page, web_server)
    expect(page.get_by_role("button", name="Forget API key")).to_be_hidden()  # none is kept
    page.evaluate(RECORD)
    page.get_by_label("Size").select_option("256x256")
    expect(page.get_by_label("Width")).to_have_value("256")
    fill_form(page, steps=12, count=2, seed=1234, sampler="dpm++2m")

    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("button", name="Cancel")).to_be_enabled()
    expect(page.locator("#status")).to_contain_text("Complete: 2 images", timeout=60_000)

    # The bar moved, never backwards, through both images, with step, % and an ETA.
    seen: list[list[Any]] = page.evaluate("window.__bar")
    values = [value for value, _ in seen]
    texts = [text for _, text in seen]
    moving = sorted({value for value in values if 0 < value < 100})
    assert len(moving) >= 3, f"the bar did not move: {seen}"
    assert values[-1] == 100, seen
    assert values == sorted(values), f"the bar went backwards: {values}"
    assert any("image 1 of 2" in text for text in texts), texts
    assert any("image 2 of 2" in text for text in texts), texts
    assert any(re.search(r"Diffusing · image \d of 2 · step \d+/12 · \d+%", t) for t in texts)
    assert any("ETA " in text for text in texts), texts
    previews: int = page.evaluate("window.__previews")
    assert previews >= 2, "the live preview was not refreshed while it drew"

    # Two images, seeds 1234 and 1235, with their size and sampler.
    results = page.locator("#gallery .result")
    expect(results).to_have_count(2)
    expect(results.nth(0).locator(".meta")).to_have_text(f"seed 1234 · 256{X}256 · dpm++2m")
    expect(results.nth(1).locator(".meta")).to_have_text(f"seed 1235 · 256{X}256 · dpm++2m")
    job_id = results.nth(0).get_attribute("data-job")
    assert job_id is not None
    assert job_id.startswith("gen_")

    # Download the second one: a PNG, the very bytes of the raw endpoint, named as the CLI would.
    with page.expect_download() as download_info:
        results.nth(1).get_by_role("link", name=re.compile("Download")).click()
    download = download_info.value
    assert download.suggested_filename == f"{job_id}-2-seed1235.png"
    data = Path(download.path()).read_bytes()
    assert data.startswith(PNG_MAGIC)
    with web_server.client() as http:
        raw = http.get(f"/v1/images/generations/{job_id}/images/1")
    assert raw.content == data

    # Full size in a dialog, closed with Escape.
    results.nth(0).get_by_role("button", name=re.compile("View image 1 of 2")).click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    assert page.eval_on_selector("#viewer-image", "img => img.naturalWidth") == 256
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()

    # The job is in the recent list.
    expect(page.locator(f'#jobs li[data-id="{job_id}"]')).to_contain_text("complete")

    page.screenshot(path=output_dir / "web-page.png", full_page=True)
    if os.environ.get("DIFFUSIOND_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(output_dir / "web-page.png", DOCS_SCREENSHOT)

    # "Reuse seed" fills the form with that seed.
    results.nth(1).get_by_role("button", name=re.compile("Reuse seed")).click()
    expect(page.get_by_label("Random seed")).not_to_be_checked()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("1235")
    expect(page.get_by_label("Seed", exact=True)).to_be_focused()


def test_cancel_a_long_generation_and_a_busy_server(
    web_server: ServerProcess, page: Page, browser: Browser
) -> None:
    open_page(page, web_server)
    fill_form(page, width=2048, height=2048, steps=150)
    expect(page.get_by_label("Size")).to_have_value("custom")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_contain_text("Diffusing", timeout=60_000)

    # A second page meets the busy server: a clear message, nothing started.
    other = browser.new_page()
    try:
        open_page(other, web_server)
        fill_form(other, width=64, height=64, steps=2)
        other.get_by_role("button", name="Generate").click()
        expect(other.locator("#status")).to_contain_text("The server is busy")
        expect(other.locator("#form-error")).to_contain_text("Try again in")
        expect(other.get_by_role("button", name="Generate")).to_be_enabled()
    finally:
        other.close()

    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_contain_text("cancelled", timeout=30_000)
    expect(page.locator("#progress-text")).to_have_text("Cancelled")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.locator("#gallery .result")).to_have_count(0)
    with web_server.client() as http:
        newest = http.get("/v1/images/generations", params={"limit": 1}).json()
        assert newest["generations"][0]["status"] == "cancelled"
        wait_idle(http)
    expect(page.locator("#jobs li").first).to_contain_text("cancelled")


def test_page_and_server_validation_shown_next_to_the_field(
    locked_server: ServerProcess, page: Page
) -> None:
    page.add_init_script(f"localStorage.setItem('diffusiond.apiKey', '{API_KEY}')")
    posts: list[Request] = []
    page.on("request", lambda request: posts.append(request) if request.method == "POST" else None)
    open_page(page, locked_server)

    # The page's own rules: nothing is sent.
    fill_form(page, width=1001, steps=0)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#width-error")).to_have_text(
        "width must be an integer from 64 to 2048, a multiple of 8"
    )
    expect(page.locator("#steps-error")).to_have_text("steps must be an integer from 1 to 150")
    expect(page.get_by_label("Width")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Width")).to_be_focused()
    assert posts == []

    # A size the page allows but this server's pixel budget does not: the server's message.
    page.get_by_label("Size").select_option("512x512")
    page.get_by_label("Steps").fill("2")
    expect(page.locator("#width-error")).to_be_hidden()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#width-error")).to_contain_text(
        f"width x height must be at most {SMALL_MAX_PIXELS} pixels"
    )
    expect(page.get_by_label("Width")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert len(posts) == 1
    expect(page.locator("#key-dialog")).to_be_hidden()  # the stored key was used


def test_the_page_asks_for_the_api_key_once_and_keeps_it(
    locked_server: ServerProcess, page: Page
) -> None:
    page.goto(locked_server.url + "/")
    dialog = page.get_by_role("dialog", name="API key needed")
    expect(dialog).to_be_visible()  # the recent-jobs list met a 401

    dialog.get_by_label("API key").fill("not-the-key-at-all")
    dialog.get_by_role("button", name="Save key").click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("refused the stored API key")
    dialog.get_by_label("API key").fill(API_KEY)
    dialog.get_by_label("API key").press("Enter")
    expect(dialog).to_be_hidden()
    assert page.evaluate("localStorage.getItem('diffusiond.apiKey')") == API_KEY

    fill_form(page, width=64, height=64, steps=2, seed=7, sampler="ddim")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Complete: 1 image", timeout=60_000)
    expect(page.locator("#gallery .result .meta")).to_have_text(f"seed 7 · 64{X}64 · ddim")

    # A new visit: the stored key is used, nothing asked.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#jobs li").first).to_contain_text("complete")
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("button", name="Forget API key")).to_be_visible()

    # The recent job opens its image again; the sampler shown comes from the PNG's recipe.
    expect(page.locator("#gallery .result")).to_have_count(0)
    page.locator("#jobs li").first.get_by_role("button").click()
    expect(page.locator("#gallery .result .meta")).to_have_text(f"seed 7 · 64{X}64 · ddim")


def test_without_the_event_stream_the_page_polls(web_server: ServerProcess, page: Page) -> None:
    def refuse(route: Route) -> None:
        route.abort()

    page.route("**/events", refuse)
    polls: list[str] = []
    page.on(
        "request",
        lambda request: polls.append(request.url) if JOB_URL.search(request.url) else None,
    )
    open_page(page, web_server)
    fill_form(page, width=64, height=64, steps=2, seed=99)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Complete: 1 image", timeout=60_000)
    expect(page.locator("#gallery .result .meta")).to_have_text(f"seed 99 · 64{X}64 · euler_a")
    assert polls, "the page neither streamed nor polled"


def test_narrow_screen_keyboard_and_labels(web_server: ServerProcess, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740})
    try:
        page = context.new_page()
        open_page(page, web_server)

        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll("input, select, textarea")]
                 .filter(control => control.labels.length === 0).map(control => control.id)"""
        )
        assert unlabelled == [], f"controls without a label: {unlabelled}"

        # Keyboard only: type into the prompt, tab to the size and the button, press Enter.
        page.get_by_label("Prompt", exact=True).focus()
        page.keyboard.type("a small red square")
        page.keyboard.press("Tab")
        expect(page.get_by_label("Negative prompt")).to_be_focused()
        fill_form(page, prompt="a small red square", width=64, height=64, steps=2, seed=5)
        page.get_by_role("button", name="Generate").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("Complete: 1 image", timeout=60_000)
        expect(page.locator("#gallery .result")).to_have_count(1)

        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 360, f"the page scrolls sideways at 360 px: {width} px wide"
    finally:
        context.close()
    with httpx.Client(base_url=web_server.url) as http:
        wait_idle(http)
