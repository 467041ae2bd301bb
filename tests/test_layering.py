"""Rules of the house that a grep can check: the core never imports flwr, nothing unpickles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_flwr():
    offenders = [p.name for p in (ROOT / "fl_unlearn").rglob("*.py") if "flwr" in _imports(p)]
    assert offenders == [], f"fl_unlearn must stay framework-agnostic; flwr imported in {offenders}"


def test_no_pickle_loading_anywhere():
    sources = [p for d in ("fl_unlearn", "strategies", "simulations") for p in (ROOT / d).rglob("*.py")]
    assert sources, "no sources found"
    bad = []
    for path in sources:
        text = path.read_text()
        if "import pickle" in text or "weights_only=False" in text or "pickle.load" in text:
            bad.append(str(path.relative_to(ROOT)))
    assert bad == [], f"pickle-based loading found in {bad}"
