"""Iterative rounds cached under real DVC (rounds/dvc.yaml on a tiny copy of the project; slow: a few minutes on
2 cores, every stage a process of its own):

- a full run of two rounds, then `dvc repro` runs nothing;
- raising the rounds from 2 to 3 runs only round 3's stages (and the progress table);
- editing round 2's train settings re-runs round 2 from train on, then all of round 3.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params
from test_dvc_pipeline import ROOT, project_files, ran, sh

pytestmark = pytest.mark.slow

ROUND_STAGES = ("round-base", "generate", "judge-pairs", "tokenize", "ref-logps", "train", "evaluate")


def round_stages(name: str) -> list[str]:
    return [f"{stage}@{name}" for stage in ROUND_STAGES]


def rounds_params(count: int) -> dict:
    params = tiny_params(max_steps=2)
    params["evaluate"].update(num_generations=4, do_sample=True)
    params["generate"].update(num_prompts=4, num_samples=2, max_new_tokens=8, batch_size=4)
    rounds = {"1": {"previous": "0", "pairs": "original", "original_pairs": 8, "train": {}}}
    for k in range(2, count + 1):  # the tiny model's answers all score alike: the original pairs keep training
        rounds[str(k)] = {"previous": str(k - 1), "pairs": "both", "original_pairs": 8, "train": {}}
    params["iterate"]["rounds"] = rounds
    return params


@pytest.fixture(scope="module")
def rounds_project(tmp_path_factory):
    if shutil.which("dvc", path=os.path.dirname(sys.executable)) is None and shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
    repo = tmp_path_factory.mktemp("rounds-project")
    for rel in project_files():
        if rel.startswith(("rounds/results/", "rounds/dvclive/")) or rel == "rounds/dvc.lock":
            continue  # the committed run's outputs: this run makes its own
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    (repo / "rounds" / "params.yaml").write_text(yaml.safe_dump(rounds_params(2), sort_keys=False))
    env = dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        PYTHONPATH=str(repo),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        DVC_NO_ANALYTICS="1",
    )
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_rounds_are_cached_a_new_round_runs_alone_and_an_edit_reruns_from_its_round(rounds_project):
    repo, env = rounds_project
    rounds = Path(repo) / "rounds"
    first = ran(sh(["dvc", "repro"], rounds, env))
    assert sorted(first) == sorted(["base", "normalize", *round_stages("1"), *round_stages("2"), "progress"])
    assert first.index("train@1") < first.index("round-base@2")  # round 2 starts from round 1's policy
    assert ran(sh(["dvc", "repro"], rounds, env)) == []
    assert ran(sh(["dvc", "status"], rounds, env)) == []

    (rounds / "params.yaml").write_text(yaml.safe_dump(rounds_params(3), sort_keys=False))
    assert sorted(ran(sh(["dvc", "repro"], rounds, env))) == sorted([*round_stages("3"), "progress"])

    params = rounds_params(3)
    params["iterate"]["rounds"]["2"]["train"] = {"beta": 0.3}
    (rounds / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = ran(sh(["dvc", "repro"], rounds, env))
    assert sorted(again) == sorted(["train@2", "evaluate@2", *round_stages("3"), "progress"])
    assert ran(sh(["dvc", "repro"], rounds, env)) == []
    progress = yaml.safe_load((rounds / "results" / "progress.json").read_text())
    assert list(progress) == ["1", "2", "3"] and all("win_rate_initial" in row for row in progress.values())
    assert (rounds / "results" / "progress.tsv").read_text().count("\n") == 4  # a header and a row per round
