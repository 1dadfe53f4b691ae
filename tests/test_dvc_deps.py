"""dvc.yaml lists every project file each stage executes, and nothing else.

The stage `dpo <name>` runs `stages/cli.py` and the stage's module; this test follows their imports
(statically, including imports inside functions, which run when the function does) through
`pipeline/` and `stages/`, and compares the files found with the stage's `.py` deps in dvc.yaml.
Run `python tests/test_dvc_deps.py` to print the deps each stage needs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

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
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


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
                anchor = ".".join(parts[:len(parts) - node.level + 1])
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
    sys.path.insert(0, str(ROOT))
    from stages.cli import STAGE_MODULES

    return STAGE_MODULES


def needed_deps(stage: str) -> set[str]:
    return executed_files("stages.cli", f"stages.{stage_modules()[stage]}")


def listed_deps(stage: dict) -> set[str]:
    """The project .py files a dvc.yaml stage lists (directories expanded)."""
    files = set()
    for dep in stage.get("deps", []):
        path = ROOT / dep
        if dep.split("/")[0] not in PACKAGES:
            continue
        if path.is_dir():
            files.update(str(p.relative_to(ROOT)) for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        else:
            files.add(dep)
    return files


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_dvc_yaml_lists_exactly_the_files_each_stage_executes(stage):
    spec = dvc_stages()[stage]
    assert spec["cmd"].split() == ["python", "-m", "stages.cli", stage], f"stage {stage}: cmd should be `python -m stages.cli {stage}`"
    needed, listed = needed_deps(stage), listed_deps(spec)
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing, f"dvc.yaml stage {stage!r} misses deps it executes: {missing}"
    assert not extra, f"dvc.yaml stage {stage!r} lists files it never executes: {extra}"


def test_the_walker_follows_lazy_and_relative_imports():
    # stages.train imports pipeline.run.training lazily through pipeline.run.tracking? No: check known edges directly
    files = executed_files("stages.evaluate")
    assert "pipeline/__init__.py" in files and "pipeline/run/trainer.py" in files and "pipeline/objective/losses.py" in files
    assert "stages/train.py" not in files  # a stage never runs another stage's module
    assert "pipeline/run/trainer.py" not in executed_files("stages.normalize")


def test_the_vision_pipeline_is_dvc_yaml_on_params_vision_yaml():
    sys.path.insert(0, str(ROOT / "scripts"))
    import dvc_yaml_vision

    assert (ROOT / "vision" / "dvc.yaml").read_text() == dvc_yaml_vision.render(), \
        "vision/dvc.yaml is stale: run python scripts/dvc_yaml_deps.py"
    vision = yaml.safe_load((ROOT / "vision" / "dvc.yaml").read_text())["stages"]
    assert list(vision) == list(dvc_stages())
    for name, spec in vision.items():
        assert spec["wdir"] == ".." and "--params params-vision.yaml" in spec["cmd"]
        paths = [p for key in ("deps", "outs", "metrics") for e in spec.get(key, []) for p in ([e] if isinstance(e, str) else e)]
        assert not [p for p in paths if p.split("/")[0] in ("artifacts", "results") and "/vision" not in p], name
        assert not [p for p in paths if p.split("/")[0] == "dvclive"], name


if __name__ == "__main__":
    for name in dvc_stages():
        print(f"{name}:")
        for dep in sorted(needed_deps(name)):
            print(f"      - {dep}")
