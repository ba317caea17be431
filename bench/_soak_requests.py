"""The soak's requests: request #n drawn from Random("SEED:n"), valid or invalid, each with
the answer it must get (see bench/soak.py)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PATH = "/v1/images/generations"
TERMINAL = ("complete", "error", "cancelled")
SAMPLERS = (
    *("euler_a", "euler", "heun", "dpm2", "dpm++2s_a"),
    *("dpm++2m", "dpm++2mv2", "lcm", "ddim", "unipc"),
)
PROMPTS = ("a lighthouse at dusk", "a cat", "mountains, oil painting", "ünïcödé 🌋 prompt", "x")
MAX_PIXELS = 256 * 256
MAX_BODY_BYTES = 64 * 1024
MAX_RSS_GROWTH_MB = 50.0
CANCEL_WINDOW_S = 1.0
DOUBLE_CANCEL = 0.2
RECHECK = 0.1  # the share of poller ticks spent re-polling terminal jobs
SHOWN_VIOLATIONS = 25
JSON_HEADERS = {"Content-Type": "application/json"}

# -- the requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str  # "valid", or the way it is invalid
    content: bytes
    expect: int  # the answer it must get: 201, 400 or 413
    body: dict[str, Any] | None = None  # the object sent, when it is one
    chunked: bool = False  # sent without Content-Length, in pieces


def _encode(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def valid_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": rng.choice(PROMPTS),
        "width": rng.randrange(64, 257, 8),
        "height": rng.randrange(64, 257, 8),
        "steps": rng.randint(1, 8),
        "count": rng.randint(1, 3),
        "sampler": rng.choice(SAMPLERS),
        "seed": rng.choice((None, -1, rng.randrange(2**32), 2**32 - 1)),
    }
    if rng.random() < 0.3:
        body["cfgScale"] = rng.choice((0, 1, 7.5, 30, round(rng.uniform(0, 30), 3)))
    if rng.random() < 0.2:
        body["negativePrompt"] = rng.choice(("", "blurry, fog"))
    if rng.random() < 0.2:
        body["clientTag"] = {"n": rng.randrange(10**6)}  # unknown extras are ignored
    if rng.random() < 0.1:  # null takes the default (steps: 20, count: 1)
        body[rng.choice(("cfgScale", "negativePrompt", "sampler", "seed", "steps", "count"))] = None
    return body


def _valid(rng: random.Random) -> Request:
    body = valid_body(rng)
    return Request("valid", _encode(body), 201, body)


WRONG_TYPES: dict[str, tuple[object, ...]] = {
    "prompt": (5, True, ["a cat"], {"text": "a cat"}),
    "negativePrompt": (0, False, ["fog"]),
    "width": ("64", 64.0, True, [64]),
    "height": ("128", 128.5, False),
    "steps": ("4", 4.0, True, {"n": 4}),
    "cfgScale": ("7.5", True, [7.5]),
    "seed": ("42", 1.5, True, [1]),
    "sampler": (3, True, ["euler"]),
    "count": (1.5, "2", False, 2.0),
}
OUT_OF_RANGE: dict[str, tuple[object, ...]] = {
    "prompt": ("", "   \n\t", "x" * 10_001),
    "negativePrompt": ("y" * 10_001,),
    "width": (0, 56, 100, 2056, -64, 4096),
    "height": (63, 73, 2056),
    "steps": (0, -1, 151, 10**9),
    "cfgScale": (-0.5, 30.01, 1000),
    "seed": (-2, 2**32, 2**63, 2**64),
    "count": (0, -1, 6, 100),
}
BAD_JSON = (
    b"",
    b"{",
    b"not json",
    b'{"prompt": "a cat",}',
    b"\xff\xfe{}",
    b"[1, 2]",
    b"null",
    b'"a cat"',
    b"42",
    b'{"prompt": "a cat", "cfgScale": NaN}',
    b'{"prompt": "a cat"} trailing',
)
BAD_SAMPLERS = ("euler_b", "EULER_A", "", "dpm++3m", "euler_a ", "k_lms")


def _field_value(kind: str, table: dict[str, tuple[object, ...]], rng: random.Random) -> Request:
    body = valid_body(rng)
    name = rng.choice(sorted(table))
    body[name] = rng.choice(table[name])
    return Request(f"{kind}:{name}", _encode(body), 400, body)


def _wrong_type(rng: random.Random) -> Request:
    return _field_value("type", WRONG_TYPES, rng)


def _out_of_range(rng: random.Random) -> Request:
    return _field_value("range", OUT_OF_RANGE, rng)


def _bad_json(rng: random.Random) -> Request:
    return Request("json", rng.choice(BAD_JSON), 400)


def _bad_sampler(rng: random.Random) -> Request:
    body = {**valid_body(rng), "sampler": rng.choice(BAD_SAMPLERS)}
    return Request("sampler", _encode(body), 400, body)


def _no_prompt(rng: random.Random) -> Request:
    body = valid_body(rng)
    if rng.random() < 0.5:
        del body["prompt"]
    else:
        body["prompt"] = None
    return Request("no-prompt", _encode(body), 400, body)


def _over_pixels(rng: random.Random) -> Request:
    """In the API's range, over this server's IMAGE_MAX_PIXELS (width/height left out: 512)."""
    body = valid_body(rng)
    choice = rng.randrange(3)
    if choice == 0:
        body.update(width=512, height=512)
    elif choice == 1:
        body.update(width=2048, height=64)
    else:  # the default 512 times at least 136 is over 256*256
        left_out, kept = rng.choice((("width", "height"), ("height", "width")))
        del body[left_out]
        body[kept] = rng.randrange(136, 257, 8)
    return Request("pixels", _encode(body), 400, body)


def _padded(rng: random.Random, size: int) -> tuple[dict[str, Any], bytes]:
    """A valid body padded by an unknown field to exactly `size` bytes."""
    body = valid_body(rng)
    body["padding"] = ""
    missing = size - len(_encode(body))
    body["padding"] = "p" * missing
    content = _encode(body)
    assert len(content) == size, (len(content), size)
    return body, content


def _oversized(rng: random.Random) -> Request:
    choice = rng.randrange(4)
    if choice == 0:  # the boundary: exactly 64 KiB is allowed
        body, content = _padded(rng, MAX_BODY_BYTES)
        return Request("padded-64KiB", content, 201, body)
    if choice == 1:
        body, content = _padded(rng, MAX_BODY_BYTES + 1)
        return Request("oversize:64KiB+1", content, 413)
    body = {**valid_body(rng), "prompt": "x" * rng.randint(70_000, 300_000)}
    if choice == 2:
        return Request("oversize:prompt", _encode(body), 413)
    return Request("oversize:chunked", _encode(body), 413, chunked=True)


INVALID_MAKERS: tuple[Callable[[random.Random], Request], ...] = (
    _wrong_type,
    _out_of_range,
    _bad_json,
    _bad_sampler,
    _oversized,
    _over_pixels,
    _no_prompt,
)


def make_request(rng: random.Random, invalid_fraction: float) -> Request:
    if rng.random() >= invalid_fraction:
        return _valid(rng)
    return rng.choice(INVALID_MAKERS)(rng)
