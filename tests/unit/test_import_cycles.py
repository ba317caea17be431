"""The CI check for import cycles (.ci/import_cycles.py) on small made-up packages, and on
the real tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / ".ci/import_cycles.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_lazy_cycle_is_found(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.sub import b\n",
            "sub/__init__.py": "",
            # Relative, inside a function, and under TYPE_CHECKING: each is an edge.
            "sub/b.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .. import c\n",
            "c.py": "def later():\n    import pkg.a\n",
        },
    )
    assert _checker().find_cycles(root, "pkg") == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert _checker().main([str(root), "pkg"]) == 1


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\nfrom . import b\n",
            "a.py": "from pkg.b import B\nclass A: ...\n",
            "b.py": "class B: ...\n",
        },
    )
    assert _checker().find_cycles(root, "pkg") == []


def test_a_submodule_importing_its_package_is_a_cycle(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {"__init__.py": "from pkg.a import A\n", "a.py": "from pkg import VERSION\nclass A: ...\n"},
    )
    assert _checker().find_cycles(root, "pkg") == [["pkg", "pkg.a", "pkg"]]


def test_the_real_tree_has_no_import_cycle() -> None:
    checker = _checker()
    assert len(checker.module_names(ROOT / "src", "diffusiond")) > 40
    assert checker.find_cycles(ROOT / "src", "diffusiond") == []
