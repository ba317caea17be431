"""A non-broker install (no `saq`, no `redis`) imports every module outside broker/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "diffusiond"

# Run in a fresh interpreter: a meta-path finder refuses `saq` and `redis` (and their
# submodules) as if they were not installed, then each module is imported in turn.
_PROBE = """
import importlib, importlib.abc, json, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"saq", "redis"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
for name in ("saq", "redis"):
    sys.modules.pop(name, None)
failed = {}
for module in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed[module] = str(exc)
try:
    importlib.import_module("diffusiond.broker.queue")
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"failed": failed, "blocked": blocked,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {"saq", "redis"})}))
"""


def _modules_outside_broker() -> list[str]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("diffusiond", *path.relative_to(PACKAGE).with_suffix("").parts)
        if "broker" in parts or parts[-1] == "__main__":
            continue
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_every_module_outside_broker_imports_without_saq_or_redis() -> None:
    modules = _modules_outside_broker()
    assert "diffusiond.server" in modules
    assert "diffusiond.cli" in modules
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules)],
        capture_output=True,
        text=True,
        check=True,
        timeout=170,
    )
    answer = json.loads(probe.stdout.strip().splitlines()[-1])
    assert answer["blocked"], "the probe did not block saq/redis: it proves nothing"
    assert answer["failed"] == {}
    assert answer["loaded"] == []
