"""Honest caching with real DVC on a tiny copy of the project (slow: about three minutes on 2 cores).

- `dvc repro` runs every stage, a second does nothing, and `dvc repro -f` gives the same dvc.lock and
  leaves git clean (every cached output and every tracked metric file is deterministic);
- editing a file a stage executes, or the local data file, makes exactly that stage and the stages
  after it run; a params edit re-runs what reads it;
- `dvc exp run -S train.beta=0.2`: `dvc exp show`, `dvc metrics diff`, `dvc plots diff` have numbers
  for both runs, with the same metric names for train and eval; docs/caching.md's comparison recipe (`dpo compare`,
  its offline curves page, a machine change named) runs;
- a queued 2×1 grid (`dvc exp run --queue`, `dvc queue start -j 2`) reuses the cached tokens and
  reference log-probs;
- `dvc push` to the local remote, and `dvc pull` in a fresh clone, leave nothing to run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.store.stage_list import STAGE_NAMES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STAGES = list(STAGE_NAMES)


def sh(cmd, cwd, env, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def restore(repo: Path, env: dict, *paths: str) -> None:
    """HEAD's `paths` (all: ".") in the workspace, trusting no cached stat: after the `dvc exp` commands git's index
    can hold HEAD's blob of dvc.lock with the stat of an experiment's dvc.lock (same size, same time), and then
    `git status` and `git checkout` take the experiment's file for HEAD's. `git read-tree` drops the stat cache."""
    sh(["git", "read-tree", "HEAD"], repo, env)
    sh(["git", "checkout", "-q", "--", *(paths or ["."])], repo, env)


def ran(output: str) -> list[str]:
    """The stages `dvc repro` ran, in order (a foreach stage by its generated name, `train@2`)."""
    return re.findall(r"Running stage '([\w@-]+)'", output)


def would_run(repo: Path, env: dict) -> list[str]:
    return ran(sh(["dvc", "repro", "--dry"], repo, env))


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # the vision default comes along: a DVC project of its own (vision/.dvc), which the root's `dvc status` skips
    return [
        rel
        for rel in listed
        if (ROOT / rel).is_file()
        and not rel.startswith(("tests/", "benchmarks/"))
        and rel not in ("dvc.lock", "params.yaml")
        and not rel.startswith(("dvclive/", "results/"))
    ]


def write_local_data(repo: Path, params: dict) -> None:
    """The built-in task's pairs as local JSONL files under data/ (a local source, as users have)."""
    from pipeline.data.sources import builtin_rows

    for split, name in (("train", "pairs.jsonl"), ("eval", "eval.jsonl")):
        rows = builtin_rows(params, split)
        (repo / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if shutil.which("dvc", path=os.path.dirname(sys.executable)) is None and shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
    from conftest import tiny_params

    repo = tmp_path_factory.mktemp("project")
    for rel in project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    params = tiny_params(beta=0.1, loss_type=["sigmoid"], eval_strategy="steps", eval_steps=2)
    write_local_data(repo, params)
    params["data"].update({"train": "data/pairs.jsonl", "eval": "data/eval.jsonl"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    remote = tmp_path_factory.mktemp("remote")
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
    sh(["dvc", "remote", "modify", "shared", "url", str(remote)], repo, env)  # the example remote, pointed here
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    first = sh(["dvc", "repro"], repo, env)
    assert ran(first) == STAGES
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "run"], repo, env)
    return repo, env


def changed_by(repo: Path, env: dict, key: tuple[str, ...], value) -> set[str]:
    """The stages `dvc status` reports after setting params.yaml's `key` to `value` (params.yaml is restored;
    an empty key: as it is)."""
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    node = params
    for part in key[:-1]:
        node = node[part]
    if key:
        node[key[-1]] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(sh(["dvc", "status", "--json"], repo, env).strip().splitlines()[-1])
    finally:
        path.write_text(original)
    return {name.split(":")[-1] for name in status}


def after(stage: str) -> list[str]:
    downstream = {
        "base": STAGES[2:],
        "normalize": STAGES[2:],
        "tokenize": STAGES[3:],
        "ref-logps": STAGES[4:],
        "train": STAGES[5:],
        "evaluate": ["export"],
        "export": [],
    }
    return [s for s in STAGES if s == stage or s in downstream[stage]]


def test_a_second_repro_does_nothing_and_a_forced_one_changes_no_byte(project):
    repo, env = project
    assert ran(sh(["dvc", "repro"], repo, env)) == []
    assert changed_by(repo, env, (), None) == set()  # `dvc status`: nothing listed, the vision project included
    lock = (repo / "dvc.lock").read_text()
    assert ran(sh(["dvc", "repro", "-f"], repo, env)) == STAGES
    assert (repo / "dvc.lock").read_text() == lock
    assert sh(["git", "status", "--porcelain"], repo, env).strip() == ""  # dvclive/, results/ unchanged too


def test_editing_code_or_data_reruns_exactly_that_stage_and_the_ones_after(project):
    repo, env = project
    # dvc names the stages whose own deps changed (those that execute the file); the stages after them re-run
    # when their outputs change
    from code_deps import needed_deps

    edits = {
        "stages/train.py": ["train"],
        "pipeline/run/tracking.py": ["train"],
        "pipeline/publish/report.py": ["evaluate"],
        "pipeline/data/tables.py": ["train", "evaluate"],
        "pipeline/run/evaluation.py": ["evaluate"],
        "pipeline/publish/export.py": ["export"],
        "stages/base.py": ["base"],
        "pipeline/data/normalize.py": ["normalize"],
    }
    for rel, expected in edits.items():
        assert [s for s in STAGES if rel in needed_deps(s)] == expected, rel  # what the imports say
        path = repo / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            assert would_run(repo, env) == expected, rel
        finally:
            path.write_bytes(original)
    path = repo / "pipeline" / "config" / "params.py"  # every stage reads params through it
    original = path.read_bytes()
    path.write_bytes(original + b"\n# edited\n")
    assert set(changed_by(repo, env, (), None)) == set(STAGES)
    path.write_bytes(original)
    assert would_run(repo, env) == []
    # the local data file: one pair deleted re-runs normalize and, its output changed, every stage after it
    data = repo / "data" / "pairs.jsonl"
    original = data.read_bytes()
    data.write_bytes(original[: original.rfind(b"\n", 0, len(original) - 1) + 1])
    try:
        assert would_run(repo, env) == ["normalize"]
        assert ran(sh(["dvc", "repro"], repo, env)) == after("normalize")
    finally:
        data.write_bytes(original)
        restore(repo, env, "dvc.lock", "dvclive", "results")
        sh(["dvc", "checkout", "-q"], repo, env)
    assert would_run(repo, env) == []
    # params: each edit re-runs the stages that read the key (dvc status names those whose own deps changed)
    assert changed_by(repo, env, ("model", "peft", "r"), 4) == {"train", "export"}
    assert changed_by(repo, env, ("model", "model_init_kwargs"), {"dtype": "float32"}) == {
        "ref-logps",
        "train",
        "evaluate",
        "export",
    }
    assert changed_by(repo, env, ("tokenize", "max_length"), 96) == {"tokenize", "export"}
    assert changed_by(repo, env, ("data", "on_invalid"), "drop") == {"normalize", "tokenize", "export"}


# file edited → the stages `dvc status` lists: those that execute it. A stage after them re-runs in `dvc repro` only
# when their output changes (see the data edit above), so an edit of the objective never re-runs the reference pass.
EDITS = {
    "pipeline/objective/losses.py": {"train", "evaluate"},  # evaluate scores the held-out pairs with the objective
    "pipeline/run/trainer.py": {"train", "evaluate"},
    "pipeline/config/loss_options.py": {"train", "evaluate", "export"},  # the stages that check train.* in full
    "pipeline/publish/report.py": {"evaluate"},
    "pipeline/data/tokenize.py": {"base", "tokenize", "train", "evaluate"},  # the warm start and the API tokenize too
    "pipeline/run/warm_start.py": {"base"},  # then everything, as the base's weights change
    "pipeline/run/reference_pass.py": {"ref-logps", "train", "evaluate"},
    "pipeline/model/head.py": {"ref-logps", "train", "evaluate"},
}


@pytest.mark.parametrize("rel", list(EDITS))
def test_an_edit_lists_only_the_stages_that_execute_the_file(project, rel):
    from code_deps import needed_deps

    repo, env = project
    assert {s for s in STAGES if rel in needed_deps(s)} == EDITS[rel], rel  # what the imports say
    path = repo / rel
    original = path.read_bytes()
    path.write_bytes(original + b"\n# edited\n")
    try:
        assert changed_by(repo, env, (), None) == EDITS[rel], rel  # what dvc says
    finally:
        path.write_bytes(original)


def numbers(row: dict, file: str) -> dict:
    """The flat metrics of one `dvc exp show --json` row for one metrics file."""
    from pipeline.publish.metrics_file import flatten

    data = row["data"]["metrics"][file]["data"]
    return {k: v for k, v in flatten(data).items() if isinstance(v, (int, float))}


def exp_show(repo: Path, env: dict) -> tuple[dict, list[dict]]:
    """`dvc exp show --json`: the baseline commit's row and its experiments' rows (each with name and data)."""
    rows = json.loads(sh(["dvc", "exp", "show", "--json"], repo, env).strip().splitlines()[-1])
    baseline = next(row for row in rows if row["rev"] != "workspace")
    return baseline, [exp["revs"][0] for exp in baseline.get("experiments") or []]


def test_an_experiment_is_compared_with_numbers(project):
    repo, env = project
    assert ran(sh(["dvc", "exp", "run", "-S", "train.beta=0.2"], repo, env)) == ["train", "evaluate", "export"]
    baseline, experiments = exp_show(repo, env)
    assert len(experiments) == 1, experiments
    runs = [experiments[0], baseline]
    for run in runs:
        train, evaluated = numbers(run, "dvclive/metrics.json"), numbers(run, "results/eval.json")
        # the same names for train and eval: train/rewards/accuracies, eval/rewards/accuracies, rewards/accuracies
        for name in ("rewards/accuracies", "rewards/margins", "logps/chosen", "loss"):
            assert f"train/{name}" in train and f"eval/{name}" in train and name in evaluated, (name, train, evaluated)
        assert not any("runtime" in k or "per_second" in k for k in train)  # timings are not metrics
    assert runs[0]["data"]["params"]["params.yaml"]["data"]["train"]["beta"] == 0.2
    name = runs[0]["name"]
    diff = json.loads(sh(["dvc", "metrics", "diff", "main", name, "--json"], repo, env).strip().splitlines()[-1])
    assert diff["results/eval.json"]["rewards.margins"]["new"] != diff["results/eval.json"]["rewards.margins"]["old"]
    params = json.loads(sh(["dvc", "params", "diff", "main", name, "--json"], repo, env).strip().splitlines()[-1])
    assert (params["params.yaml"]["train.beta"]["old"], params["params.yaml"]["train.beta"]["new"]) == (0.1, 0.2)
    plots = json.loads(sh(["dvc", "plots", "diff", "main", name, "--json"], repo, env).strip().splitlines()[-1])
    assert {"loss", "rewards", "accuracy", "logps"} <= set(plots["data"])
    rewards = plots["data"]["rewards"][0]["content"]["data"]["values"]
    assert {v["rev"] for v in rewards} >= {"main", name}
    steps = sorted(
        {
            int(v["step"])
            for v in rewards
            if v["filename::field"].startswith("train/rewards/chosen.tsv") and v["rev"] == "main"
        }
    )
    assert steps[0] > 0 and steps == sorted(set(steps))  # points sit at the optimizer step they describe


def test_the_readmes_comparison_recipe_runs_offline_and_names_the_machine(project, tmp_path):
    """The baseline made here (the fixture's `dvc repro`, committed) and an experiment: both record where they ran
    (results/eval.json, every manifest); `dpo compare` shows the changed param and the metrics that matter, whole;
    `--html` writes every run's curves on a page that fetches nothing; a machine change shows in `dvc metrics diff`
    and makes `dpo compare` warn; `dvc plots diff`'s page (dvc_plots/) is git-ignored."""
    from pipeline.core.environment import environment

    repo, env = project
    experiments = exp_show(repo, env)[1]
    if not experiments:  # run alone: make the experiment the test before makes
        sh(["dvc", "exp", "run", "-S", "train.beta=0.2"], repo, env)
        experiments = exp_show(repo, env)[1]
    here = environment()
    machine = ("cpu", "cpu_flags", "torch", "transformers", "cuda")
    recorded = json.loads((repo / "results" / "eval.json").read_text())["environment"]
    assert {k: recorded[k] for k in machine} == {k: here[k] for k in machine}
    for artifact in ("base", "normalized", "tokenized", "ref_logps", "train", "eval", "export"):
        manifest = json.loads((repo / "artifacts" / artifact / "manifest.json").read_text())
        assert {k: manifest["environment"][k] for k in machine} == {k: here[k] for k in machine}, artifact

    compare = [sys.executable, "-m", "stages.cli", "compare"]
    page = tmp_path / "compare.html"
    out = sh([*compare, "--html", str(page)], repo, env)
    header, _, *rows = out.split("\n\n")[0].splitlines()
    assert header.split()[:2] == ["run", "rev"] and "train.beta" in header.split()
    assert header.split()[-3:] == ["rewards/accuracies", "rewards/margins", "win_rate"]
    beta = header.split().index("train.beta")
    table = {row.split()[0]: row.split() for row in rows}
    assert table["main"][beta] == "0.1" and table[experiments[0]["name"]][beta] == "0.2"
    print(out)
    assert all(math.isfinite(float(cell)) for row in table.values() for cell in row[-3:-1])
    assert {row[-1] for row in table.values()} == {"-"}  # local data: no judge, no win rate
    assert "warning" not in out and "curves: " in out

    html = page.read_text()
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", html, re.I) and "<script" not in html
    loss = re.search(r'data-group="train/loss">(.*?)</figure>', html, re.S).group(1)
    assert loss.count("<polyline") == len(table)  # one line per run

    metrics = repo / "results" / "eval.json"  # the workspace's results, as if made on another machine
    original = metrics.read_bytes()
    moved = json.loads(original)
    moved["environment"]["cpu"] = "Another CPU"
    metrics.write_text(json.dumps(moved))
    try:
        diff = json.loads(sh(["dvc", "metrics", "diff", "main", "--json"], repo, env).strip().splitlines()[-1])
        assert diff["results/eval.json"]["environment.cpu"] == {"old": here["cpu"], "new": "Another CPU"}
        assert "warning: These runs were not all made on one machine" in sh([*compare, "workspace"], repo, env)
    finally:
        metrics.write_bytes(original)

    sh(["dvc", "plots", "diff", "main", experiments[0]["name"]], repo, env)
    assert (repo / "dvc_plots" / "index.html").exists()
    assert "dvc_plots" not in sh(["git", "status", "--porcelain"], repo, env)


def test_a_queued_grid_reuses_tokens_and_reference_logps(project):
    repo, env = project
    sh(["dvc", "exp", "run", "--queue", "-S", "train.beta=0.3,0.4", "-S", "train.loss_type=[sigmoid]"], repo, env)
    sh(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    betas = set()
    for run in exp_show(repo, env)[1]:
        betas.add(run["data"]["params"]["params.yaml"]["data"]["train"]["beta"])
        log = sh(["dvc", "queue", "logs", run["name"]], repo, env, check=False)
        if "Running stage" in log:  # the worker's log: only train onwards ran
            assert set(ran(log)) == {"train", "evaluate", "export"}, log[-2000:]
        assert numbers(run, "results/eval.json")["rewards/accuracies"] >= 0
    assert {0.3, 0.4} <= betas
    sh(["dvc", "queue", "remove", "--all"], repo, env, check=False)


def test_push_then_pull_in_a_fresh_clone_leaves_nothing_to_run(project, tmp_path):
    repo, env = project
    restore(repo, env)
    assert (repo / "dvc.lock").read_bytes() == subprocess.run(
        ["git", "show", "HEAD:dvc.lock"], cwd=repo, capture_output=True, check=True
    ).stdout
    sh(["dvc", "checkout", "-q"], repo, env, check=False)
    sh(["dvc", "push"], repo, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    sh(["dvc", "pull"], clone, dict(env, PYTHONPATH=str(clone)))
    for artifact in ("base", "normalized", "tokenized", "ref_logps", "train", "eval", "export"):
        assert (clone / "artifacts" / artifact / "manifest.json").exists(), artifact
    assert ran(sh(["dvc", "repro"], clone, dict(env, PYTHONPATH=str(clone)))) == []
    assert sh(["git", "status", "--porcelain"], clone, env).strip() == ""


def test_a_sweeps_runs_are_experiments_that_dvc_shows_applies_and_finishes(project):
    """`dpo sweep` over the cached artifacts: each run becomes an experiment with its params, curves and where it
    stands (sweep/chunks, sweep/stopped), the baseline's dvc.lock and nothing else of the workspace; `dvc exp apply`
    of the stopped run then `dvc repro` trains it on from the sweep's checkpoint."""
    repo, env = project
    restore(repo, env)
    sh(["dvc", "checkout", "-q", "--force"], repo, env, check=False)
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["sweep"] = {"name": "sw", "grid": {"train.learning_rate": [1e-4, 3e-3]}, "chunks": 2, "metric": "loss"}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    edited = path.read_text()
    lock = (repo / "dvc.lock").read_text()
    out = sh([sys.executable, "-m", "stages.cli", "sweep"], repo, env)
    assert "saved 2 runs as DVC experiments (sw-c1, sw-c2)" in out, out[-2000:]
    assert path.read_text() == edited and (repo / "dvc.lock").read_text() == lock  # the workspace is put back
    assert sh(["git", "status", "--porcelain", "--", "dvclive"], repo, env).strip() == ""
    runs = {run["name"]: run for run in exp_show(repo, env)[1]}
    assert {"sw-c1", "sw-c2"} <= set(runs)
    state = json.loads((repo / "artifacts" / "sweeps" / "sw" / "state.json").read_text())["runs"]
    for name, run in state.items():
        row = runs[f"sw-{name}"]
        assert (
            row["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"]
            == run["overrides"]["train.learning_rate"]
        )
        live = numbers(row, "dvclive/metrics.json")
        assert (live["sweep/chunks"], live["sweep/stopped"]) == (run["chunks_done"], int(run["state"] == "stopped"))
        assert live["eval/loss"] == pytest.approx(run["history"][-1]["metrics"]["loss"])
        assert sh(["git", "show", f"{row['rev']}:dvc.lock"], repo, env) == lock
    stopped = next(name for name, run in state.items() if run["state"] == "stopped")
    assert state[stopped]["chunks_done"] == 1
    plots = json.loads(sh(["dvc", "plots", "diff", "sw-c1", "sw-c2", "--json"], repo, env).strip().splitlines()[-1])
    assert {v["rev"] for v in plots["data"]["loss"][0]["content"]["data"]["values"]} == {"sw-c1", "sw-c2"}
    sh(["dvc", "exp", "apply", f"sw-{stopped}"], repo, env)
    repro = sh(["dvc", "repro"], repo, env)
    assert ran(repro) == ["train", "evaluate", "export"] and "resuming from" in repro, repro[-3000:]
    path.write_text(original)
    restore(repo, env)
    sh(["dvc", "checkout", "-q", "--force"], repo, env, check=False)
    sh(["dvc", "exp", "remove", "sw-c1", "sw-c2"], repo, env, check=False)
