"""The layers of popo_lite point one way: the algorithm (core) imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "popo_lite"
ABOVE_CORE = ("engine", "training", "panel", "evaluation", "planning", "data")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_core_imports_nothing_from_the_layers_above_it():
    files = sorted((PACKAGE / "core").glob("*.py"))
    assert len(files) > 5
    upward = {
        f"{path.name} imports {name}"
        for path in files
        for name in _imports(path)
        if name.startswith("popo_lite.") and name.split(".")[1] in ABOVE_CORE
    }
    assert upward == set()
