"""The web page's model, LoRA, scheduler and clip-skip controls (issue 17), in a real Chromium
against a real server with a models dir and a LoRA folder.

The lists come from the server's GET /v1/models, /v1/loras and /v1/samplers; where a test
needs an entry the server does not have (to meet the server's own 400), or a server without
those routes, it answers that GET itself with page.route. The POSTs always go to the server."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, Route, expect

from diffusiond.backends.builtin_model import ensure_builtin_model
from tests.e2e.test_web import X, fill_form, open_page
from tests.e2e.test_web_edit import generate, record_posts
from tests.support import loras as lora_files
from tests.support.server import ServerProcess, start_server, wait_idle

pytestmark = pytest.mark.e2e

# What index.html lists when the server has no GET /v1/samplers.
PAGE_SAMPLERS = ["euler_a", "euler", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "lcm",
                 "ddim", "unipc", "er_sde", "euler_cfg_pp", "euler_a_cfg_pp"]  # fmt: skip
PAGE_SCHEDULERS = ["discrete", "karras", "exponential", "sgm_uniform", "simple"]
NEW_FIELDS = ("model", "loras", "scheduler", "clipSkip")


@pytest.fixture(scope="module")
def catalog_server(
    web_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server whose models dir holds `alpha` (the built-in model's folder under another
    name) and whose LoRA folder holds `detail` (kohya), `style` (peft) and `xl` (made for
    SDXL: never offered with these models)."""
    models_dir = tmp_path_factory.mktemp("web-models")
    shutil.copytree(ensure_builtin_model(web_home), models_dir / "alpha")
    loras_dir = models_dir / "loras"
    loras_dir.mkdir()
    lora_files.kohya(loras_dir / "detail.safetensors")
    lora_files.peft(loras_dir / "style.safetensors")
    lora_files.sdxl_header_lora(loras_dir / "xl.safetensors")
    process = start_server(web_home, "--models-dir", str(models_dir))
    yield process
    assert process.stop() == 0, process.text()


def open_choices(page: Page, server: ServerProcess) -> None:
    """Open the page and wait until it has asked the server for its lists."""
    open_page(page, server)
    expect(page.locator("body")).to_have_attribute("data-choices", "ready")


def option_values(select: Locator) -> list[str]:
    return [value or "" for value in select.locator("option").evaluate_all(
        "options => options.map((option) => option.value)"
    )]  # fmt: skip


def catalog(server: ServerProcess) -> dict[str, Any]:
    with server.client() as http:
        return {path: http.get(f"/v1/{path}").json() for path in ("models", "loras", "samplers")}


def answer_with(page: Page, path: str, change: Callable[[Any], Any]) -> None:
    """GET /v1/PATH answered with the server's own body, changed by CHANGE."""

    def handle(route: Route) -> None:
        response = route.fetch()
        assert response.ok, f"GET /v1/{path}: {response.status}"
        route.fulfill(response=response, json=change(response.json()))

    page.route(f"**/v1/{path}", handle)


def answer(page: Page, path: str, body: object) -> None:
    """GET /v1/PATH answered with BODY, whatever the server has."""

    def handle(route: Route) -> None:
        route.fulfill(json=body)

    page.route(f"**/v1/{path}", handle)


def answer_404(page: Page, path: str) -> None:
    """GET /v1/PATH answered as by a server without that route."""

    def handle(route: Route) -> None:
        error = {"code": "NOT_FOUND", "message": "not found", "details": None}
        route.fulfill(status=404, json={"error": error})

    page.route(f"**/v1/{path}", handle)


def result_png(server: ServerProcess, page: Page, nth: int) -> bytes:
    job_id = page.locator("#gallery .result").nth(nth).get_attribute("data-job")
    with server.client() as http:
        return http.get(f"/v1/images/generations/{job_id}/images/0").content


def test_the_catalog_in_the_pickers_and_in_the_request(
    catalog_server: ServerProcess, page: Page
) -> None:
    listed = catalog(catalog_server)
    models = listed["models"]["models"]
    default = next(model for model in models if model["default"])
    usable = [lora["name"] for lora in listed["loras"]["loras"]
              if lora["architecture"] == default["architecture"]]  # fmt: skip
    assert {"alpha", default["id"]} <= {model["id"] for model in models}
    assert {"detail", "style"} <= set(usable)
    assert "xl" not in usable
    posts = record_posts(page)
    open_choices(page, catalog_server)

    # The model select: the catalog, the default chosen, the loaded ones marked.
    model = page.get_by_label("Model", exact=True)
    assert option_values(model) == [entry["id"] for entry in models]
    expect(model).to_have_value(default["id"])
    for entry in models:
        text = model.locator(f'option[value="{entry["id"]}"]').inner_text()
        assert ("loaded" in text) == entry["loaded"], (text, entry)
    # The sampler and scheduler selects: the server's lists.
    assert option_values(page.get_by_label("Sampler")) == listed["samplers"]["samplers"]
    assert option_values(page.get_by_label("Scheduler")) == listed["samplers"]["schedulers"]

    # LoRAs: only the model's architecture's, each once.
    page.get_by_role("button", name="Add a LoRA").click()
    expect(page.get_by_label("LoRA 1", exact=True)).to_be_focused()
    assert option_values(page.get_by_label("LoRA 1", exact=True)) == usable
    page.get_by_label("LoRA 1", exact=True).select_option("detail")
    page.get_by_label("Weight of LoRA 1").fill("0.8")
    page.get_by_role("button", name="Add a LoRA").click()
    second = page.get_by_label("LoRA 2", exact=True)
    expect(second).not_to_have_value("detail")
    expect(second.locator('option[value="detail"]')).to_be_disabled()
    page.get_by_role("button", name="Remove LoRA 2").click()
    expect(page.get_by_label("LoRA 2", exact=True)).to_have_count(0)

    page.get_by_label("Scheduler").select_option("karras")
    page.get_by_label("Clip skip").fill("2")
    fill_form(page, width=64, height=64, steps=2, seed=11, sampler="dpm++2m")
    first = generate(page, posts)
    assert first["loras"] == [{"name": "detail", "weight": 0.8}]
    assert (first["scheduler"], first["clipSkip"], first["sampler"]) == ("karras", 2, "dpm++2m")
    assert "model" not in first, "the default model is not named"
    made_with = page.locator("#gallery .result .made-with")
    expect(made_with.first).to_have_text(
        f"model {default['id']} · LoRA detail 0.8 · karras · clip skip 2"
    )

    # Another model, back to the default scheduler and clip skip: only `model` is new.
    model.select_option("alpha")
    expect(page.get_by_label("LoRA 1", exact=True)).to_have_value("detail")  # same architecture
    page.get_by_label("Scheduler").select_option("discrete")
    page.get_by_label("Clip skip").fill("1")
    alpha = generate(page, posts)
    assert alpha["model"] == "alpha"
    assert alpha["loras"] == [{"name": "detail", "weight": 0.8}]
    assert not {"scheduler", "clipSkip"} & set(alpha), alpha
    expect(made_with.first).to_have_text("model alpha · LoRA detail 0.8")

    # "Use these settings" of the first image: its model, LoRAs, scheduler, clip skip, seed;
    # drawn again, the same bytes.
    page.locator("#gallery .result").nth(1).get_by_role(
        "button", name="Use the settings of image 1 of 1, seed 11 in the form"
    ).click()
    expect(model).to_have_value(default["id"])
    expect(page.get_by_label("Scheduler")).to_have_value("karras")
    expect(page.get_by_label("Clip skip")).to_have_value("2")
    expect(page.get_by_label("Weight of LoRA 1")).to_have_value("0.8")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("11")
    again = generate(page, posts)
    assert {key: again.get(key) for key in NEW_FIELDS} == {
        key: first.get(key) for key in NEW_FIELDS
    }
    assert result_png(catalog_server, page, 0) == result_png(catalog_server, page, 2)
    with catalog_server.client() as http:
        wait_idle(http)


def test_the_servers_refusals_shown_by_their_controls(
    catalog_server: ServerProcess, page: Page
) -> None:
    default = next(m for m in catalog(catalog_server)["models"]["models"] if m["default"])
    ghost_lora = {"name": "ghost", "architecture": default["architecture"]}
    ghost_model = {**default, "id": "phantom", "loaded": False, "default": False}
    answer_with(page, "loras", lambda body: {"loras": [*body["loras"], ghost_lora]})
    answer_with(page, "models", lambda body: {"models": [*body["models"], ghost_model]})
    posts = record_posts(page)
    open_choices(page, catalog_server)
    fill_form(page, width=64, height=64, steps=2)

    # The page's own rules first: nothing is sent.
    page.get_by_role("button", name="Add a LoRA").click()
    page.get_by_label("Weight of LoRA 1").fill("5.5")
    page.get_by_label("Clip skip").fill("13")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#loras-error")).to_contain_text(
        "weight of LoRA 1 must be a number from -5 to 5"
    )
    expect(page.locator("#clipSkip-error")).to_have_text("clipSkip must be an integer from 1 to 12")
    expect(page.get_by_label("Clip skip")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("LoRA 1", exact=True)).to_be_focused()  # the first in the form
    assert posts == []
    page.get_by_label("Clip skip").fill("1")
    expect(page.locator("#clipSkip-error")).to_be_hidden()

    # A LoRA the server does not have: its 400, by the LoRA picker.
    page.get_by_label("LoRA 1", exact=True).select_option("ghost")
    expect(page.locator("#loras-error")).to_be_hidden()
    page.get_by_label("Weight of LoRA 1").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#loras-error")).to_contain_text("loras")
    expect(page.locator("#loras-error")).to_contain_text("ghost")
    expect(page.get_by_label("LoRA 1", exact=True)).to_be_focused()
    expect(page.locator("#status")).to_contain_text("The server refused the request")
    assert posts[-1]["loras"] == [{"name": "ghost", "weight": 0.5}]
    described = page.get_by_label("Weight of LoRA 1").get_attribute("aria-describedby") or ""
    assert "loras-error" in described.split()
    page.get_by_role("button", name="Remove LoRA 1").click()

    # A model it does not have: by the model select.
    page.get_by_label("Model", exact=True).select_option("phantom")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#model-error")).to_contain_text("phantom")
    expect(page.get_by_label("Model", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Model", exact=True)).to_be_focused()
    assert posts[-1]["model"] == "phantom"
    assert "loras" not in posts[-1]
    page.get_by_label("Model", exact=True).select_option(default["id"])
    expect(page.locator("#model-error")).to_be_hidden()

    # A scheduler its sampler cannot run (the server's pair rule): by the scheduler select.
    page.get_by_label("Sampler").select_option("ddim")
    page.get_by_label("Scheduler").select_option("karras")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#scheduler-error")).to_contain_text(
        "scheduler karras cannot be used with sampler ddim"
    )
    expect(page.get_by_label("Scheduler")).to_be_focused()
    assert (posts[-1]["sampler"], posts[-1]["scheduler"]) == ("ddim", "karras")
    assert len(posts) == 3
    expect(page.locator("#form-error")).to_be_hidden()


def test_without_the_catalog_routes_the_page_keeps_its_own_lists(
    web_server: ServerProcess, page: Page
) -> None:
    for path in ("samplers", "models", "loras"):
        answer_404(page, path)
    posts = record_posts(page)
    open_choices(page, web_server)
    assert option_values(page.get_by_label("Sampler")) == PAGE_SAMPLERS
    assert option_values(page.get_by_label("Scheduler")) == PAGE_SCHEDULERS
    expect(page.get_by_label("Sampler")).to_have_value("euler_a")
    expect(page.locator("#model-field")).to_be_hidden()
    expect(page.locator("#lora-picker")).to_be_hidden()

    fill_form(page, width=64, height=64, steps=2, seed=4, sampler="heun")
    body = generate(page, posts)
    assert body["sampler"] == "heun"
    assert not set(NEW_FIELDS) & set(body), body
    expect(page.locator("#gallery .result .meta")).to_have_text(f"seed 4 · 64{X}64 · heun")

    # The scheduler still goes out when it is not the default (the server parses it).
    page.get_by_label("Scheduler").select_option("karras")
    page.get_by_label("Clip skip").fill("2")
    fill_form(page, width=64, height=64, steps=2, seed=4, sampler="euler")
    body = generate(page, posts)
    assert (body["scheduler"], body["clipSkip"]) == ("karras", 2)
    expect(page.locator("#gallery .result .made-with").first).to_contain_text(
        "karras · clip skip 2"
    )
    with web_server.client() as http:
        wait_idle(http)


def fake_catalog(page: Page) -> None:
    """Two models of two architectures and ten LoRAs: nine for the first, one for the other."""
    models: list[dict[str, object]] = [
        {"id": "small", "architecture": "sd1", "format": "diffusers"},
        {"id": "big", "architecture": "sdxl", "format": "single-file"},
    ]
    for model in models:
        model["loaded"] = model["default"] = model["id"] == "small"
    loras = [{"name": f"sd-{n}", "architecture": "sd1"} for n in range(1, 10)]
    loras.append({"name": "xl-one", "architecture": "sdxl"})
    answer(page, "models", {"models": models})
    answer(page, "loras", {"loras": loras})


def test_loras_follow_the_model_at_most_eight(
    web_server: ServerProcess, page: Page, output_dir: Path
) -> None:
    fake_catalog(page)
    open_choices(page, web_server)
    model = page.get_by_label("Model", exact=True)
    expect(model).to_have_value("small")
    expect(model.locator('option[value="small"]')).to_have_text(
        "small (sd1, diffusers, default, loaded)"
    )
    expect(model.locator('option[value="big"]')).to_have_text("big (sdxl, single-file)")

    add = page.get_by_role("button", name="Add a LoRA")
    for _ in range(8):
        add.click()
    expect(add).to_be_disabled()  # eight at most, though a ninth would fit the model
    expect(page.locator("#loras-help")).to_contain_text("at most 8")
    chosen = [page.get_by_label(f"LoRA {n}", exact=True).input_value() for n in range(1, 9)]
    assert chosen == [f"sd-{n}" for n in range(1, 9)], "each LoRA once"
    assert "xl-one" not in option_values(page.get_by_label("LoRA 1", exact=True))
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
             .filter(control => control.labels.length === 0).map(control => control.id)"""
    )
    assert unlabelled == [], f"controls without a label: {unlabelled}"
    page.set_viewport_size({"width": 360, "height": 740})
    width = page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways at 360 px with 8 LoRAs: {width} px wide"
    page.locator("#generate-form").screenshot(path=output_dir / "narrow-loras.png")
    page.set_viewport_size({"width": 1280, "height": 900})

    # Removing one renumbers the rest and frees its name for another row.
    page.get_by_role("button", name="Remove LoRA 3").click()
    expect(page.get_by_label("LoRA 3", exact=True)).to_have_value("sd-4")
    expect(page.get_by_label("LoRA 3", exact=True)).to_be_focused()
    expect(add).to_be_enabled()
    expect(page.get_by_label("LoRA 1", exact=True).locator('option[value="sd-3"]')).to_be_enabled()

    # Another architecture: the rows for the old one go; the new one's LoRA is offered.
    model.select_option("big")
    expect(page.locator("#lora-rows li")).to_have_count(0)
    expect(page.locator("#status")).to_contain_text("not for the model big")
    add.click()
    assert option_values(page.get_by_label("LoRA 1", exact=True)) == ["xl-one"]
    expect(add).to_be_disabled()  # nothing left for this model


def test_a_recipe_of_a_model_this_server_lacks(web_server: ServerProcess, page: Page) -> None:
    """The button "Use these settings" keeps what this server cannot do as it was, and says so."""
    fake_catalog(page)
    posts = record_posts(page)
    open_choices(page, web_server)
    fill_form(page, prompt="a barn", width=64, height=64, steps=2, seed=8)
    generate(page, posts)
    # The recipe names the server's real model, which this (made-up) catalog lacks.
    recipe_model = page.locator("#gallery .result .made-with").inner_text().split(" · ")[0]
    assert recipe_model.startswith("model ")
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_role("button", name="Use the settings of image 1 of 1, seed 8 in the form").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a barn")
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
    expect(page.get_by_label("Model", exact=True)).to_have_value("small")
    expect(page.locator("#status")).to_contain_text(f"This server lacks the {recipe_model}")


def test_without_a_model_list_the_servers_architecture_picks_the_loras(
    web_server: ServerProcess, page: Page
) -> None:
    with web_server.client() as http:
        architecture = http.get("/health").json()["architecture"]
    answer_404(page, "models")
    loras = [
        {"name": "mine", "architecture": architecture},
        {"name": "other", "architecture": f"not-{architecture}"},
    ]
    answer(page, "loras", {"loras": loras})
    open_choices(page, web_server)
    expect(page.locator("#model-field")).to_be_hidden()
    expect(page.locator("#loras-help")).to_contain_text("1 for this model")
    page.get_by_role("button", name="Add a LoRA").click()
    assert option_values(page.get_by_label("LoRA 1", exact=True)) == ["mine"]
    expect(page.get_by_role("button", name="Add a LoRA")).to_be_disabled()


def test_a_split_component_model_shows_its_files(catalog_server: ServerProcess, page: Page) -> None:
    """The page shows the files GET /v1/models lists for a model of split components (the
    listing itself is proven over HTTP in tests/integration/test_components.py)."""
    files = {"diffusion_model": "flux1-schnell-Q8_0.gguf", "vae": "ae.safetensors"}
    flux = {"id": "fluxy", "architecture": "flux1", "format": "components", "loaded": False,
            "default": False, "components": files}  # fmt: skip
    answer_with(page, "models", lambda body: {"models": [*body["models"], flux]})
    open_choices(page, catalog_server)
    model = page.get_by_label("Model", exact=True)
    expect(page.locator("#model-files")).to_be_hidden()  # the default is one folder
    option = model.locator('option[value="fluxy"]')
    expect(option).to_have_text("fluxy (flux1, components)")
    expect(option).to_have_attribute(
        "title", "diffusion_model flux1-schnell-Q8_0.gguf · vae ae.safetensors"
    )
    model.select_option("fluxy")
    expect(page.locator("#model-files")).to_have_text(
        "Files: diffusion_model flux1-schnell-Q8_0.gguf · vae ae.safetensors"
    )
    model.select_option(index=0)
    expect(page.locator("#model-files")).to_be_hidden()
