"""The README and docs/ link only inside the repository, and every link lands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [target for target in LINK.findall(text) if not target.startswith("http")]


def _broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in _links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        lands = linked.is_relative_to(root) and linked.exists()
        if lands and anchor and linked.suffix == ".md":
            lands = anchor in _anchors(linked)
        if not lands:
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_lands(page: Path) -> None:
    assert _broken_links(page) == []


def test_the_checker_sees_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("## Precision: `--dtype`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[gone](missing.md) [here](#title) [not](#nowhere) "
        "[out](../outside.md) [there](other.md#precision---dtype)\n"
    )
    assert _broken_links(page, tmp_path) == ["missing.md", "#nowhere", "../outside.md"]


def test_the_readme_stays_short_and_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    assert "../shared" not in readme
