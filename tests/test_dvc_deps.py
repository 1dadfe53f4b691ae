"""dvc.yaml lists every project file each stage executes, and nothing else (`scripts/code_deps.py` finds them)."""

from __future__ import annotations

import pytest
import yaml

from code_deps import PACKAGES, ROOT, executed_files, needed_deps


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
    assert spec["cmd"].split() == ["python", "-m", "stages.cli", stage], (
        f"stage {stage}: cmd should be `python -m stages.cli {stage}`"
    )
    needed, listed = needed_deps(stage), listed_deps(spec)
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing, f"dvc.yaml stage {stage!r} misses deps it executes: {missing}"
    assert not extra, f"dvc.yaml stage {stage!r} lists files it never executes: {extra}"


def test_dvc_yaml_runs_the_stage_list_in_order():
    from pipeline.store.stage_list import STAGE_NAMES

    assert tuple(dvc_stages()) == STAGE_NAMES, "dvc.yaml's stages and pipeline/store/stage_list.py disagree"


def test_the_walker_follows_lazy_and_relative_imports():
    files = executed_files("stages.evaluate")
    assert (
        "pipeline/__init__.py" in files
        and "pipeline/run/trainer.py" in files
        and "pipeline/objective/losses.py" in files
    )
    assert "stages/train.py" not in files  # a stage never runs another stage's module
    assert "pipeline/run/trainer.py" not in executed_files("stages.normalize")


def test_the_vision_pipeline_is_dvc_yaml_on_params_vision_yaml():
    import dvc_yaml_vision

    assert (ROOT / "vision" / "dvc.yaml").read_text() == dvc_yaml_vision.render(), (
        "vision/dvc.yaml is stale: run python scripts/dvc_yaml_deps.py"
    )
    assert (ROOT / "vision" / ".dvc" / "config").is_file(), "vision/ is a DVC project of its own (dvc init --subdir)"
    vision = yaml.safe_load((ROOT / "vision" / "dvc.yaml").read_text())["stages"]
    assert list(vision) == list(dvc_stages())
    for name, spec in vision.items():
        assert spec["cmd"].startswith("cd .. && python -m stages.cli") and "--params vision/params.yaml" in spec["cmd"]
        paths = [
            p
            for key in ("deps", "outs", "metrics")
            for e in spec.get(key, [])
            for p in ([e] if isinstance(e, str) else e)
        ]
        # code and data from the repository, everything it writes inside vision/
        assert all(p.startswith("../") or p.split("/")[0] in ("artifacts", "results", "dvclive") for p in paths), name
        assert [p for p in spec.get("outs", []) if isinstance(p, str)] == [
            p for p in dvc_stages()[name].get("outs", []) if isinstance(p, str)
        ], name


def test_the_rounds_pipeline_is_generated_runs_dpo_stages_and_lists_the_files_each_executes():
    import dvc_yaml_rounds

    assert (ROOT / "rounds" / "dvc.yaml").read_text() == dvc_yaml_rounds.render(), (
        "rounds/dvc.yaml is stale: run python scripts/dvc_yaml_deps.py"
    )
    assert (ROOT / "rounds" / ".dvc" / "config").is_file(), "rounds/ is a DVC project of its own (dvc init --subdir)"
    stages = yaml.safe_load((ROOT / "rounds" / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        spec = spec.get("do", spec)  # a foreach stage: its template
        words = spec["cmd"].split()
        assert words[:6] == ["cd", "..", "&&", "python", "-m", "stages.cli"], name
        listed = {dep[3:] for dep in spec["deps"] if dep.startswith("../") and dep[3:].split("/")[0] in PACKAGES}
        assert listed == needed_deps(words[6]), name
