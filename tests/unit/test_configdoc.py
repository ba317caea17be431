"""docs/configuration.md is what the generator makes from settings.py's option table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from diffusiond import configdoc
from diffusiond.settings import OPTIONS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_page_is_what_the_generator_prints() -> None:
    assert configdoc.check(PAGE), f"docs/configuration.md is stale: {configdoc.REGENERATE}"


def test_every_option_and_alias_is_on_the_page() -> None:
    page = configdoc.render()
    for option in OPTIONS:
        assert f"`{option.flag}" in page
        for name in option.names():
            assert f"`{name}`" in page


def test_the_check_fails_on_a_page_that_differs(tmp_path: Path) -> None:
    copy = tmp_path / "configuration.md"
    copy.write_text(PAGE.read_text(encoding="utf-8").replace("`300000`", "`300001`"))
    assert not configdoc.check(copy)
    assert configdoc.main(["--check", str(copy)]) == 1
    assert not configdoc.check(tmp_path / "missing.md")


def test_a_changed_option_changes_the_page() -> None:
    changed = [dataclasses.replace(OPTIONS[0], help="something else entirely")]
    assert "something else entirely" in configdoc.render(changed)
    assert configdoc.render(changed) != configdoc.render()


def test_a_computed_default_needs_words() -> None:
    home = next(option for option in OPTIONS if option.field == "home")
    with pytest.raises(ValueError, match="--home"):
        configdoc.default_text(dataclasses.replace(home, shown_default=""))


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "diffusiond.configdoc"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == configdoc.render()
    stale = tmp_path / "stale.md"
    stale.write_text("# old\n")
    checked = subprocess.run(
        [sys.executable, "-m", "diffusiond.configdoc", "--check", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 1
    assert "python -m diffusiond.configdoc" in checked.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "diffusiond.configdoc", "--check", str(PAGE)], check=False
    )
    assert ok.returncode == 0
