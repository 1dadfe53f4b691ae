"""dvc.yaml is honest: a tiny `dvc repro` runs every stage, a second does nothing, and a
`train.beta` or `train.loss_type` experiment re-runs only train and what depends on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if shutil.which("dvc", path=os.path.dirname(sys.executable)) is None and shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
    from conftest import tiny_params

    repo = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked + ["dvc.yaml", ".dvc/config", ".dvcignore"]:
        if (ROOT / rel).is_file() and not rel.startswith(("tests/", "benchmarks/")) and rel != "dvc.lock":
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    params = tiny_params(beta=0.1, loss_type=["sigmoid"])  # keys the experiments below override
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=str(repo), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def changed_by(repo: Path, env: dict, key: tuple[str, ...], value) -> set[str]:
    """The stages `dvc status` reports after setting params.yaml's `key` to `value` (params.yaml is restored)."""
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    node = params
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True,
                                           text=True, check=True).stdout)
    finally:
        path.write_text(original)
    return {name.split(":")[-1] for name in status}


def test_repro_runs_all_stages_then_nothing_then_only_train_onwards(project):
    repo, env = project
    first = sh(["dvc", "repro"], repo, env)
    assert ran(first) == ["base", "normalize", "tokenize", "ref-logps", "train", "evaluate", "export"]
    assert (repo / "artifacts" / "metrics" / "eval.json").exists()
    assert ran(sh(["dvc", "repro"], repo, env)) == []
    metrics = sh(["dvc", "metrics", "show"], repo, env)
    assert "win_rate" in metrics and "artifacts/live/metrics.json" in metrics
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "lock"], repo, env)
    # which stages a params edit invalidates (dvc status names the stages whose own deps changed)
    assert changed_by(repo, env, ("model", "peft", "r"), 4) == {"train", "export"}
    assert changed_by(repo, env, ("model", "model_init_kwargs"), {"dtype": "float32"}) == {"ref-logps", "train", "evaluate", "export"}
    assert changed_by(repo, env, ("tokenize", "max_length"), 96) == {"tokenize", "export"}
    assert changed_by(repo, env, ("data", "on_invalid"), "drop") == {"normalize", "tokenize", "export"}
    beta = sh(["dvc", "exp", "run", "-S", "train.beta=0.2"], repo, env)
    assert ran(beta) == ["train", "evaluate", "export"]
    ipo = sh(["dvc", "exp", "run", "-S", "train.loss_type=[ipo]"], repo, env)
    assert ran(ipo) == ["train", "evaluate", "export"]
