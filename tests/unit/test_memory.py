"""The start-up bound on PyTorch's CPU kernel caches (see diffusiond.memory)."""

from __future__ import annotations

import os

import pytest

from diffusiond import cli
from diffusiond.memory import (
    KERNEL_CACHE_CAPACITIES,
    KERNEL_CACHE_VARIABLES,
    bound_kernel_caches,
)


def test_both_caches_are_bounded_where_unset() -> None:
    environ = {"PATH": "/bin"}
    chosen = bound_kernel_caches(
        environ, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 96, "LRU_CACHE_CAPACITY": 2}
    )
    assert chosen == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "96", "LRU_CACHE_CAPACITY": "2"}
    assert environ == {"PATH": "/bin", **chosen}


def test_a_capacity_the_user_set_wins() -> None:
    environ = {"LRU_CACHE_CAPACITY": "1024"}
    chosen = bound_kernel_caches(
        environ, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 96, "LRU_CACHE_CAPACITY": 2}
    )
    assert chosen == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "96"}
    assert environ["LRU_CACHE_CAPACITY"] == "1024"


def test_the_command_line_bounds_them_before_anything_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in KERNEL_CACHE_VARIABLES:
        # set first, so that monkeypatch removes what main() adds when the test ends
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit):
        cli.main(["--version"])  # exits while parsing: the bound must come first
    set_now = {name: os.environ.get(name) for name in KERNEL_CACHE_VARIABLES}
    assert set_now == {name: str(entries) for name, entries in KERNEL_CACHE_CAPACITIES.items()}
