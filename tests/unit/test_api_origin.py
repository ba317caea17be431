"""Host and Origin checks (issue 14, item 2): no web page on another origin may use the
server, by a cross-site POST (CSRF) or by rebinding its own name to 127.0.0.1."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from diffusiond.testing.requests import GENERATIONS, SMALL, poll_until
from tests.support.inprocess import CONFIG, InProcessApi, in_process_api

EVIL = "http://evil.test"


@pytest.fixture
def api() -> Iterator[InProcessApi]:
    with in_process_api() as running:
        yield running


def refused(response: Any, code: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("path", [GENERATIONS, "/health", "/", "/openapi.json", "/ui/app.js"])
def test_a_foreign_host_is_refused_everywhere(api: InProcessApi, path: str) -> None:
    # DNS rebinding: the page's own name, now pointing at 127.0.0.1, is in the Host header.
    refused(api.client.get(path, headers={"Host": "evil.test:8081"}), "FORBIDDEN_HOST")


@pytest.mark.parametrize("host", [":8081", "", "localhost.evil.test", "127.0.0.1.evil.test"])
def test_empty_or_lookalike_host_names_are_refused(api: InProcessApi, host: str) -> None:
    refused(api.client.get(GENERATIONS, headers={"Host": host}), "FORBIDDEN_HOST")


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:8081", "127.0.0.1:8081", "127.9.8.7", "[::1]:8081", "[::1]"]
)
def test_loopback_names_are_allowed(api: InProcessApi, host: str) -> None:
    assert api.client.get(GENERATIONS, headers={"Host": host}).status_code == 200


def test_a_cross_site_text_plain_post_is_refused_and_starts_nothing(api: InProcessApi) -> None:
    # What a hostile page's fetch(..., {mode: "no-cors", body: "..."}) sends.
    response = api.client.post(
        GENERATIONS,
        content=b'{"prompt": "x", "width": 64, "height": 64, "steps": 2}',
        headers={"Content-Type": "text/plain", "Origin": EVIL},
    )
    refused(response, "FORBIDDEN_ORIGIN")
    assert api.client.get(GENERATIONS).json() == {"generations": []}
    for origin in ("null", "http://localhost:9999", "https://localhost"):
        refused(api.client.get(GENERATIONS, headers={"Origin": origin}), "FORBIDDEN_ORIGIN")


def test_curl_without_an_origin_and_the_page_itself_still_work(api: InProcessApi) -> None:
    # curl -d sends application/x-www-form-urlencoded and no Origin.
    curl = api.client.post(
        GENERATIONS,
        content=b'{"prompt": "x", "width": 64, "height": 64, "steps": 2}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert curl.status_code == 201, curl.text
    poll_until(api.client, curl.json()["id"])
    same_origin = {"Host": "localhost:8081", "Origin": "http://localhost:8081"}
    page = api.client.post(GENERATIONS, json=SMALL, headers=same_origin)
    assert page.status_code == 201, page.text
    poll_until(api.client, page.json()["id"])


def test_configured_hosts_and_cors_origins_are_allowed() -> None:
    config = dataclasses.replace(
        CONFIG, allowed_hosts=("gpu.example", ".lab.example"), cors_origins=("http://app.test",)
    )
    with in_process_api(config=config) as api:
        get = api.client.get
        for host in ("gpu.example:8081", "GPU.example", "box.lab.example", "lab.example"):
            assert get(GENERATIONS, headers={"Host": host}).status_code == 200, host
        refused(get(GENERATIONS, headers={"Host": "gpu.example.evil.test"}), "FORBIDDEN_HOST")
        allowed = get(GENERATIONS, headers={"Origin": "http://app.test"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://app.test"
        refused(get(GENERATIONS, headers={"Origin": EVIL}), "FORBIDDEN_ORIGIN")


def test_a_star_allows_any_host() -> None:
    with in_process_api(config=dataclasses.replace(CONFIG, allowed_hosts=("*",))) as api:
        assert api.client.get(GENERATIONS, headers={"Host": "any.test"}).status_code == 200


def test_a_server_bound_beyond_loopback_answers_to_its_address_and_name() -> None:
    import socket

    on_lan = dataclasses.replace(CONFIG, bound_host="10.1.2.3")
    with in_process_api(config=on_lan) as api:
        get = api.client.get
        assert get(GENERATIONS, headers={"Host": "10.1.2.3:8081"}).status_code == 200
        assert get(GENERATIONS, headers={"Host": socket.gethostname()}).status_code == 200
        refused(get(GENERATIONS, headers={"Host": "10.1.2.4:8081"}), "FORBIDDEN_HOST")
    everywhere = dataclasses.replace(CONFIG, bound_host="0.0.0.0")
    with in_process_api(config=everywhere) as api:
        get = api.client.get
        # An address typed as digits needs no DNS, so it cannot be rebound: any is fine.
        assert get(GENERATIONS, headers={"Host": "192.168.7.9:8081"}).status_code == 200
        assert get(GENERATIONS, headers={"Host": "[fe80::1]:8081"}).status_code == 200
        refused(get(GENERATIONS, headers={"Host": "evil.test"}), "FORBIDDEN_HOST")
