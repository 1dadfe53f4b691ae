"""Under `dvc repro`, a stage refuses to read a local input that its dvc.yaml deps do not cover.

DVC re-runs a stage only when one of its listed deps changes; a data file read from elsewhere could change
without DVC noticing, and the cached output would silently be stale. DVC runs every stage command with
`DVC_ROOT` (the project) and `DVC_STAGE` (the stage's name) in the environment; outside DVC nothing is checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from pipeline.core.errors import PipelineError


def running_stage() -> tuple[str, Path] | None:
    """(stage name, dvc.yaml) of the DVC stage running this process, or None outside DVC."""
    stage, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage or not root:
        return None
    dvcfile, _, name = stage.rpartition(":")  # `name` for the root dvc.yaml, `sub/dvc.yaml:name` otherwise
    return name, Path(root) / (dvcfile or "dvc.yaml")


INTERPOLATION = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def _lookup(tree: Any, dotted: str, where: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise PipelineError(f"{where}: ${{{dotted}}} does not resolve; check the foreach and params.yaml.")
        tree = tree[part]
    return tree


def _foreach_definition(stages: dict, stage: str, dvc_yaml: Path) -> dict | None:
    """The definition of `name@key`, a stage a `foreach` generates, with `${key}` and `${item...}` resolved in its
    deps (DVC's interpolation for the plain forms dvc.yaml uses; a `${...}` foreach is read from params.yaml)."""
    name, _, key = stage.partition("@")
    template = stages.get(name)
    if not isinstance(template, dict) or "foreach" not in template:
        return None
    items = template["foreach"]
    if isinstance(items, str):
        match = INTERPOLATION.fullmatch(items.strip())
        params = yaml.safe_load((dvc_yaml.parent / "params.yaml").read_text()) or {}
        items = _lookup(params, match.group(1), str(dvc_yaml)) if match else None
    item = items.get(key) if isinstance(items, dict) else key if isinstance(items, list) else None
    if item is None:
        return None
    scope = {"key": key, "item": item}

    def resolve(text: str) -> str:
        return INTERPOLATION.sub(lambda m: str(_lookup(scope, m.group(1), f"{dvc_yaml}: {stage}")), text)

    definition = dict(template.get("do") or {})
    definition["deps"] = [resolve(d) if isinstance(d, str) else d for d in definition.get("deps") or []]
    return definition


def stage_deps(dvc_yaml: Path, stage: str) -> list[Path]:
    """The resolved paths of the deps a stage of `dvc_yaml` lists (relative to its `wdir`); a stage a `foreach`
    generates (`name@key`) with its interpolation resolved."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
        definition = stages.get(stage)
        if definition is None and "@" in stage:
            definition = _foreach_definition(stages, stage, dvc_yaml)
    except (OSError, yaml.YAMLError) as err:
        raise PipelineError(f"{dvc_yaml}: cannot read it to check the {stage} stage's deps ({err}).") from None
    if not isinstance(definition, dict):
        raise PipelineError(
            f"{dvc_yaml}: no stage {stage!r} (DVC_STAGE), so its deps cannot be checked; run the stage "
            "through a plain stage of this dvc.yaml, or unset DVC_STAGE to run it outside DVC."
        )
    wdir = dvc_yaml.parent / definition.get("wdir", ".")
    return [(wdir / dep).resolve() for dep in definition.get("deps") or [] if isinstance(dep, str) and "://" not in dep]


def dvc_dep_paths() -> list[Path] | None:
    """The resolved deps of the DVC stage running this process; None outside DVC."""
    running = running_stage()
    return None if running is None else stage_deps(running[1], running[0])


def covers(dep: Path, path: Path) -> bool:
    return path == dep or dep in path.parents


def require_dvc_deps(reads: Iterable[tuple[str, str, list[Path]]]) -> None:
    """Under DVC, refuse any read `(params key, value as given, local paths)` whose paths the running stage's
    deps do not cover (a dep may be a file or a directory)."""
    reads, running = list(reads), running_stage()
    if running is None or not reads:
        return
    stage, dvc_yaml = running
    deps = stage_deps(dvc_yaml, stage)
    data_dir = (dvc_yaml.parent / "data").resolve()
    for key, given, paths in reads:
        if all(any(covers(dep, path.resolve()) for dep in deps) for path in paths):
            continue
        fix = "move it under data/ or " if data_dir in deps else ""
        raise PipelineError(
            f"{key}={given} is not a dependency of the {stage} stage in dvc.yaml, so DVC would not "
            f"re-run {stage} when it changes; {fix}add it to stages.{stage}.deps in dvc.yaml."
        )
