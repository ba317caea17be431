"""Fail when modules of src/diffusiond import each other in a cycle.

Usage: python .ci/import_cycles.py [SOURCE_ROOT [PACKAGE]]  (default: src diffusiond)

The graph: one node per module of the package (a package is its `__init__.py`). An edge
runs from a module to each module of the package it imports, wherever the import stands:
at the top, inside a function (a lazy import), under `if TYPE_CHECKING:`, in a `try`. Both
`import a.b` and `from a import b`, absolute or relative, count:

- `import a.b.c` and `from a.b.c import name` are an edge to `a.b.c`; `from a.b import c`
  is an edge to `a.b.c` when `c` is a module, else to the package `a.b` (its `__init__`).
- The packages above an imported module (`a` and `a.b` for `a.b.c`) are not edges of their
  own. Python runs them first, but a package already being initialised is simply reused,
  so a package whose `__init__` imports its submodules does not form a cycle with every
  submodule that imports a sibling. It does when a submodule imports the package itself
  (`from diffusiond.client import Client` inside diffusiond/client/sync.py while
  client/__init__.py imports sync): that one reads a half-made module, and is reported.

A module importing itself is no edge. A cycle is any strongly connected set of two or more
modules; each is printed as one path through it, and the exit status is 1. Standard
library only: it runs before anything is installed.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Each module of `package` under `root` (a source folder), by dotted name."""
    found: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(the module named, the names taken from it) for every import in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[: max(keep, 0)] + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (see the module docstring)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, names in _imported(tree, name, path.name == "__init__.py"):
            for taken in names or [None]:
                submodule = f"{target}.{taken}"
                if taken is not None and submodule in modules:
                    graph[name].add(submodule)
                elif target in modules and target != name:
                    graph[name].add(target)
    return graph


def _reached_from(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` leads to (itself too, if it lies on a cycle), each with the
    module it is first reached from: a breadth-first search tree."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] - came_from.keys()):
                came_from[nxt] = node
                following.append(nxt)
        frontier = following
    return came_from


def _cycle_through(came_from: dict[str, str], start: str) -> list[str]:
    path = [start]
    while path[-1] != start or len(path) == 1:
        path.append(came_from[path[-1]])
    return path[::-1]


def find_cycles(root: Path, package: str) -> list[list[str]]:
    """One cycle per set of modules that import each other (a strongly connected set), as a
    path that ends where it began. The graph is small: a search from every module will do."""
    graph = import_graph(root, package)
    reached = {node: _reached_from(graph, node) for node in graph}
    covered: set[str] = set()
    cycles: list[list[str]] = []
    for node in sorted(graph):
        if node in covered or node not in reached[node]:
            continue
        covered |= {other for other in reached[node] if node in reached[other]}
        cycles.append(_cycle_through(reached[node], node))
    return cycles


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "src"
    package = argv[1] if len(argv) > 1 else "diffusiond"
    cycles = find_cycles(root, package)
    for cycle in cycles:
        sys.stdout.write("import cycle: " + " -> ".join(cycle) + "\n")
    if cycles:
        return 1
    count = len(module_names(root, package))
    sys.stdout.write(f"no import cycles among the {count} modules of {package}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
