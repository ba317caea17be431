"""schemathesis fuzzes every operation of the OpenAPI document against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, not_a_server_error, positive_data_acceptance
from schemathesis.config import SchemathesisConfig

from diffusiond.api.openapi import openapi_document
from tests.support.server import ServerProcess, start_server

DOCUMENT = openapi_document(max_batch=5, secured=False)
# Invalid data must be refused with a 4xx; 413 counts too (a body over 64 KiB, which long
# strings of escaped non-ASCII characters reach).
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "404", "405", "409", "413", "415", "422"]
            }
        }
    }
)
# The AUTOMATIC1111 routes are left out: a valid txt2img may hold the caller for minutes
# (n_iter up to 100, a wait for a free worker); tests/unit/test_a1111_api.py checks their rules.
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG).exclude(path_regex="^/sdapi/")


@pytest.fixture(scope="module")
def fuzz_server(model_home: Path) -> Iterator[ServerProcess]:
    # Accepted jobs stay small and short, so the fuzzer meets a mostly idle server.
    process = start_server(
        model_home,
        env={
            "IMAGE_MAX_PIXELS": str(128 * 128),
            "IMAGE_GENERATION_TIMEOUT_MS": "2000",
            "IMAGE_RESULT_TTL_MS": "2000",
            "IMAGE_CLEANUP_INTERVAL_MS": "500",
        },
    )
    yield process
    assert process.stop() == 0, process.text()


def test_the_served_document_is_the_fuzzed_one(fuzz_server: ServerProcess) -> None:
    served = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    assert served == DOCUMENT
    operations = {
        (path, method)
        for path, item in served["paths"].items()
        for method in item
        if method != "parameters" and not path.startswith("/sdapi/")
    }
    assert operations == {
        ("/v1/images/generations", "post"),
        ("/v1/images/generations", "get"),
        ("/v1/images/generations/{id}", "get"),
        ("/v1/images/generations/{id}", "delete"),
        ("/v1/images/generations/{id}/events", "get"),
        ("/v1/images/generations/{id}/images/{index}", "get"),
        ("/health", "get"),
    }


@schemathesis.check
def no_internal_error(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """No 500 (INTERNAL_ERROR) or other 5xx; 503 SERVER_BUSY/NOT_READY are the contract's."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{case.method} {case.path} answered {response.status_code}")
    return None


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_500_or_breaks_the_schema(
    case: schemathesis.Case[Any], fuzz_server: ServerProcess
) -> None:
    # Every default check (status codes, content types, headers and bodies that match the
    # document, invalid data refused) with two changes: 503 is the contract's answer when
    # busy, so "no 5xx" becomes "no 5xx but 503"; and a request valid by the document can
    # still be refused by design (503 while busy, 400 over the pixel budget).
    case.call_and_validate(
        base_url=fuzz_server.url,
        excluded_checks=[not_a_server_error, positive_data_acceptance],
        additional_checks=[no_internal_error],
    )


# The digits that used to reach int() and answer 500: non-ASCII digits str.isdigit() takes,
# and runs longer than int()'s 4,300-digit limit. The schema-driven fuzzing above also
# generates the `limit` query, the integer `index` and the `Prefer`/`Last-Event-ID` headers
# the document declares; these are the known offenders, over real HTTP.
BAD_INTEGERS = ["\u00b2", "\u0663", "\uff11", "9" * 5000, "-1", "1e3", ""]


def test_no_integer_parameter_answers_500_over_http(fuzz_server: ServerProcess) -> None:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as http:
        created = http.post(
            "/v1/images/generations",
            json={"prompt": "x", "width": 64, "height": 64, "steps": 1},
            headers={"Idempotency-Key": "fuzz-digits"},
        )
        assert created.status_code == 201, created.text
        job = f"/v1/images/generations/{created.json()['id']}"
        for raw in BAD_INTEGERS:
            header = raw.encode()
            answers = {
                "limit": http.get("/v1/images/generations", params={"limit": raw}),
                "index": http.get(f"{job}/images/{quote(raw, safe='') or 'x'}"),
                "Last-Event-ID": http.get(f"{job}/events", headers={b"Last-Event-ID": header}),
                "Prefer": http.post(
                    "/v1/images/generations",
                    json={"prompt": "x", "width": 64, "height": 64, "steps": 1},
                    headers={b"Prefer": b"wait=" + header, b"Idempotency-Key": b"fuzz-digits"},
                ),
            }
            for name, response in answers.items():
                assert response.status_code < 500, (name, raw[:10], response.text[:200])
            if raw:
                assert answers["limit"].status_code == 400
                assert answers["limit"].json()["error"]["details"]["field"] == "limit"
