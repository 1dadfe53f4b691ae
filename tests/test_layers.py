"""The folder tree is the architecture: import-linter's contracts (pyproject.toml) hold, and a module imports the
project's modules at its top, where a reader (and `lint-imports`) sees them, except the vision modules, which need
the optional `pillow` and are imported only when a vision model or dataset is used."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("pipeline.builtin.vision_task", "pipeline.builtin.vision_model", "pipeline.run.warm_start_vision")


def inner_imports(path: Path) -> list[str]:
    """`line: module` of every first-party import inside a function or class of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                    names = [inner.module] + [f"{inner.module}.{a.name}" for a in inner.names]
                elif isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                else:
                    continue
                first_party = [n for n in names if n.split(".")[0] in ("pipeline", "stages")]
                if first_party and not any(n in OPTIONAL for n in first_party):
                    found.append(f"{inner.lineno}: {names[0]}")
    return found


@pytest.mark.parametrize("path", sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]), ids=str)
def test_project_modules_are_imported_at_the_top(path):
    assert inner_imports(path) == [], f"{path.relative_to(ROOT)} imports project modules inside a function"


def test_the_layer_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
