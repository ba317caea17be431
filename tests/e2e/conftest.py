"""A real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against real
servers with the built-in model.

The browser and the servers live as long as a test module: Playwright's event loop and the
servers are gone before the rest of the suite runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, Page, sync_playwright

from tests.support.server import ServerProcess, start_server

CHROMIUM = Path(os.environ.get("DIFFUSIOND_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags, Chromium's own connections get refused here and
# slow its start; nothing it could fetch is wanted anyway.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = Path(__file__).resolve().parent / "output"  # git-ignored: screenshots of the runs
API_KEY = "e2e-key-0123456789abcdef"
# The locked server's pixel budget: smaller than the page's default 512 x 512, so the page
# sends a size that only the server refuses.
SMALL_MAX_PIXELS = 256 * 256
# The locked server's body limit (the least it takes): an input image's body can pass it.
SMALL_MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="session")
def chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    reason = (
        f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium) or set "
        "DIFFUSIOND_CHROMIUM to run the web page's end-to-end tests"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def web_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("diffusiond-web-home")


@pytest.fixture(scope="module")
def web_server(web_home: Path) -> Iterator[ServerProcess]:
    """An open server on loopback, as `diffusiond serve` starts by default."""
    process = start_server(web_home)
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture(scope="module")
def locked_server(web_home: Path) -> Iterator[ServerProcess]:
    """A server with an API key, a small pixel budget and a small body limit."""
    env = {
        "IMAGE_API_KEY": API_KEY,
        "IMAGE_MAX_PIXELS": str(SMALL_MAX_PIXELS),
        "IMAGE_MAX_BODY_BYTES": str(SMALL_MAX_BODY_BYTES),
    }
    process = start_server(web_home, env=env)
    yield process
    assert process.stop() == 0, process.text()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (empty storage) per test; uncaught script errors fail it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(30_000)
    opened = context.new_page()
    script_errors: list[Error] = []

    def record(error: Error) -> None:  # a plain function: Playwright wraps the handler
        script_errors.append(error)

    opened.on("pageerror", record)
    yield opened
    context.close()
    assert not script_errors, f"the page threw: {script_errors}"


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    folder = OUTPUT / str(request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
