"""Integers from the query, headers and path: one parser, never a 500 (issue 14, item 4).

`str.isdigit()` accepts '²' and other non-ASCII digits that `int()` refuses, and `int()`
refuses strings of more than 4,300 digits: both used to end in 500 INTERNAL_ERROR.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from diffusiond.api.params import MAX_DIGITS, int_param, read_uint
from diffusiond.errors import InvalidRequest
from diffusiond.testing.requests import GENERATIONS, SMALL, poll_until, submit
from tests.support.inprocess import InProcessApi, in_process_api

HUGE = "9" * 5000
ARABIC_THREE, FULLWIDTH_ONE = "\u0663", "\uff11"  # digits to str.isdigit(), not ASCII
# POSTs repeating this key replay the finished job: a `Prefer: wait` on them ends at once.
DONE_KEY = {"Idempotency-Key": "params-done"}
ODD_DIGITS = [
    "²",
    ARABIC_THREE,
    FULLWIDTH_ONE,
    "1_0",
    " 1",
    "+1",
    "-1",
    "",
    "0x1",
    HUGE,
    "1" * (MAX_DIGITS + 1),
]


@pytest.fixture(scope="module")
def api() -> Iterator[InProcessApi]:
    with in_process_api() as running:
        yield running


@pytest.fixture(scope="module")
def done_id(api: InProcessApi) -> str:
    job_id = submit(api.client, SMALL, **DONE_KEY)
    poll_until(api.client, job_id)
    return job_id


def test_read_uint_takes_only_plain_ascii_digits_of_bounded_length() -> None:
    assert read_uint("0") == 0
    assert read_uint("0042") == 42
    assert read_uint("9" * MAX_DIGITS) == int("9" * MAX_DIGITS)
    for raw in ODD_DIGITS:
        assert read_uint(raw) is None, raw


def test_int_param_names_the_parameter_and_its_range() -> None:
    assert int_param("7", name="limit", low=1, high=10) == 7
    for raw in ("0", "11", "²", HUGE):
        with pytest.raises(InvalidRequest) as caught:
            int_param(raw, name="limit", low=1, high=10)
        assert caught.value.details == {"field": "limit", "rule": "an integer from 1 to 10"}
        assert len(caught.value.message) < 200  # a 5,000-digit value is not echoed whole


@pytest.mark.parametrize("raw", ["²", HUGE, FULLWIDTH_ONE])
def test_a_bad_limit_is_400_naming_limit(api: InProcessApi, raw: str) -> None:
    response = api.client.get(GENERATIONS, params={"limit": raw})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"]["field"] == "limit"


@pytest.mark.parametrize("raw", ["²", HUGE, FULLWIDTH_ONE])
def test_a_bad_image_index_is_404(api: InProcessApi, done_id: str, raw: str) -> None:
    response = api.client.get(f"{GENERATIONS}/{done_id}/images/{raw}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("raw", ["²", HUGE])
def test_an_unreadable_prefer_wait_is_ignored(api: InProcessApi, raw: str) -> None:
    response = api.client.post(GENERATIONS, json=SMALL, headers={b"Prefer": f"wait={raw}".encode()})
    assert response.status_code == 201, response.text
    assert "preference-applied" not in response.headers
    poll_until(api.client, response.json()["id"])


@pytest.mark.parametrize("raw", ["²", HUGE])
def test_an_unreadable_last_event_id_replays_from_the_start(
    api: InProcessApi, done_id: str, raw: str
) -> None:
    headers = {b"Last-Event-ID": raw.encode()}
    response = api.client.get(f"{GENERATIONS}/{done_id}/events", headers=headers)
    assert response.status_code == 200, response.text
    assert "event: complete" in response.text


@pytest.mark.parametrize(("raw", "status"), [("²", 400), ("-5", 400), (HUGE, 413)])
def test_a_bad_content_length_is_a_4xx(api: InProcessApi, raw: str, status: int) -> None:
    response = api.client.post(
        GENERATIONS,
        content=b"{}",
        headers={b"Content-Type": b"application/json", b"Content-Length": raw.encode()},
    )
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["details"]["field"] == "Content-Length"


# Any text at all where an integer is expected: digits of every script, long runs of
# digits, signs, spaces. Every answer is a 4xx or a success, never a 5xx.
integer_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=30),
    st.integers(min_value=4290, max_value=6000).map(lambda n: "1" * n),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=integer_text)
def test_no_integer_parameter_answers_a_server_error(
    api: InProcessApi, done_id: str, raw: str
) -> None:
    http: TestClient = api.client
    header_safe = raw.encode("utf-8")
    answers = [
        http.get(GENERATIONS, params={"limit": raw}),
        http.get(f"{GENERATIONS}/{done_id}/images/{quote(raw, safe='')}"),
        http.get(f"{GENERATIONS}/{done_id}/events", headers={b"Last-Event-ID": header_safe}),
        http.post(
            GENERATIONS,
            json=SMALL,
            headers={b"Prefer": b"wait=" + header_safe, b"Idempotency-Key": b"params-done"},
        ),
    ]
    for response in answers:
        assert response.status_code < 500 or response.status_code == 503, (
            response.request.url,
            response.status_code,
            response.text[:200],
        )
