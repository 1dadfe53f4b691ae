"""The project files each `dpo` stage executes: its module, `stages/cli.py`, and everything they import.

Imports are followed statically (including imports inside functions, which run when the function does) through
`pipeline/` and `stages/`; `dvc.yaml` lists the result as each stage's code deps (`scripts/dvc_yaml_deps.py`
writes them, `tests/test_dvc_deps.py` checks them). Run `python scripts/code_deps.py` to print them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The file that defines the project module `name` (a package's `__init__.py`), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, name: str) -> set[str]:
    """Dotted names of the project modules `path` (module `name`) imports anywhere but under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{anchor}.{node.module}" if node.module else anchor
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # submodules imported by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if module_file(m) is not None}


def executed_files(*modules: str) -> set[str]:
    """Every project file importing `modules` executes: the modules, what they import, and their packages."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c
            prefix = ".".join(parts[:i])
            if prefix in seen or module_file(prefix) is None:
                continue
            seen.add(prefix)
            todo.extend(imported_modules(module_file(prefix), prefix))
    return {str(module_file(m).relative_to(ROOT)) for m in seen}


def stage_modules() -> dict[str, str]:
    """`dpo` subcommand → its module under stages/ (the one home of the stage list: `stages/cli.py`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from stages.cli import STAGE_MODULES

    return STAGE_MODULES


def needed_deps(stage: str) -> set[str]:
    return executed_files("stages.cli", f"stages.{stage_modules()[stage]}")


if __name__ == "__main__":
    for name in stage_modules():
        print(f"{name}:")
        for dep in sorted(needed_deps(name)):
            print(f"      - {dep}")
