"""The evaluate stage with each judge on one trained tiny run of the built-in task: a reward model trained from the
task's pairs (examples/train_reward_model.py) agrees with the task's program judge, the lm-evaluation-harness
figures of a local task land in results/eval.json beside the judged figures, and what cannot work is refused
before any model is loaded."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import stages.evaluate as evaluate_stage
import stages.train as train_stage
from conftest import prepare_stages, tiny_params
from pipeline.builtin import task
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.publish.metrics_file import read_metrics
from pipeline.run import evaluation
from pipeline.store.artifacts import MANIFEST

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_reward_model.py"
LM_EVAL = Path(__file__).parent / "data" / "lm_eval"
GENERATIONS = 48


def with_evaluate(params: dict, **evaluate) -> dict:
    raw = copy.deepcopy(params)
    for key, value in evaluate.items():
        raw["evaluate"][key] = value
    return check_params(raw)


def evaluate(params: dict, root: Path, name: str) -> tuple[dict, list[dict]]:
    """Run the evaluate stage into root/<name>; its metrics and generations."""
    metrics = root / name / "results" / "eval.json"
    evaluate_stage.run(
        params,
        root / "train",
        root / "tokenized",
        root / "ref_logps",
        root / "normalized",
        root / "base",
        root / name / "eval",
        metrics,
        root / "live",
        root / name / "results" / "report.html",
    )
    lines = (root / name / "eval" / "generations.jsonl").read_text().splitlines()
    return read_metrics(metrics), [json.loads(line) for line in lines]


def local_task(root: Path) -> str:
    """tests/data/lm_eval's task in an include_path of its own, its JSONL made absolute."""
    config = yaml.safe_load((LM_EVAL / "tiny_sentiment.yaml").read_text())
    config["dataset_kwargs"] = {
        "data_files": {"test": str(LM_EVAL / "tiny_sentiment.jsonl")},
        "cache_dir": str(root / "datasets_cache"),
    }
    tasks = root / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "tiny_sentiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(tasks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of the built-in task trained far enough that policy and reference answer differently."""
    import importlib.util

    root = tmp_path_factory.mktemp("judged")
    params = tiny_params(learning_rate=1e-3, num_train_epochs=1)
    raw = copy.deepcopy(params)
    raw["model"]["builtin"]["warmup_steps"] = 400  # well-formed reviews, so the program judge has scores to give
    # far enough that the policy praises, in well-formed reviews: a reward model trained on the task's pairs never saw
    # malformed text, and rates it by its adjectives (trained to 5e-4 for 2 epochs, 11 of 48 policy answers were
    # malformed, and the reward model agreed with the program on 77% of the comparisons)
    raw["data"]["builtin"]["num_pairs"] = 160
    raw["data"]["builtin"]["num_eval_pairs"] = GENERATIONS
    raw["evaluate"]["num_generations"] = GENERATIONS
    params = check_params(raw)
    prepare_stages(params, root, through="ref-logps")
    train_stage.run(
        params, root / "tokenized", root / "ref_logps", root / "base", root / "train", root / "ck", root / "live"
    )
    spec = importlib.util.spec_from_file_location("train_reward_model", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        example.train_reward_model(
            root / "reward_model",
            pairs=256,
            steps=40,
            batch_size=16,
            learning_rate=3e-3,
            seed=params["seed"],
            eval_pairs=64,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
        )
    finally:
        torch.set_num_threads(threads)
    return params, root


@pytest.fixture(scope="module")
def judged(trained):
    """The same run evaluated by the program judge, and by the reward model with the harness's local task."""
    params, root = trained
    program = evaluate(params, root, "builtin")
    rm_params = with_evaluate(
        params,
        judge="reward_model",
        judge_model={"name_or_path": str(root / "reward_model")},
        lm_eval={"tasks": ["tiny_sentiment"], "include_path": local_task(root), "limit": 8},
    )
    return program, evaluate(rm_params, root, "reward_model"), root


def test_a_trained_reward_model_agrees_with_the_program_judge(judged):
    (program, by_program), (rm, by_rm), _ = judged
    assert [(e["policy"], e["reference"]) for e in by_program] == [(e["policy"], e["reference"]) for e in by_rm]
    assert program["num_comparisons"] == rm["num_comparisons"] == GENERATIONS
    decisive = sum(e["outcome"] != 0.5 for e in by_program)
    assert decisive >= GENERATIONS // 2, program  # the policy moved: most answers differ in the judge's eyes
    assert all(e["policy_score"] != task.MALFORMED for e in by_program)  # what the reward model learned to read
    agreement = sum(a["outcome"] == b["outcome"] for a, b in zip(by_program, by_rm)) / GENERATIONS
    assert agreement >= 0.9, (agreement, program, rm)
    assert program["win_rate_low"] <= rm["win_rate"] <= program["win_rate_high"], (program, rm)
    assert rm["score_margin"] > 0 and rm["policy_mean_score"] > rm["reference_mean_score"]


def test_the_judged_figures_are_in_eval_json_and_the_report(judged):
    (program, _), (rm, _), root = judged
    for metrics in (program, rm):
        assert metrics["win_rate_low"] <= metrics["win_rate"] <= metrics["win_rate_high"]
        assert metrics["wins"] + metrics["ties"] + metrics["losses"] == metrics["num_comparisons"]
        assert 0 <= metrics["length_controlled_win_rate"] <= 1 and metrics["unparsed_verdicts"] == 0
        assert metrics["policy_mean_length"] > 0 and metrics["reference_mean_length"] > 0
    page = (root / "reward_model" / "results" / "report.html").read_text()
    assert "95% interval" in page and 'id="length-controlled"' in page and 'id="lengths"' in page
    assert 'id="disagreements"' in page and "by the reward_model judge" in page
    assert 'id="harness-table"' in page and "tiny_sentiment" in page


def test_the_harness_runs_on_policy_and_reference_into_eval_json(judged):
    _, (rm, _), root = judged
    for side in ("policy", "reference"):
        assert 0 <= rm[f"lm_eval/{side}/tiny_sentiment/acc"] <= 1
        assert rm[f"lm_eval/{side}/tiny_sentiment/acc_stderr"] >= 0
    nested = json.loads((root / "reward_model" / "results" / "eval.json").read_text())
    assert set(nested["lm_eval"]) == {"policy", "reference"}  # dvc metrics diff reads it nested


def test_the_judge_and_its_model_are_recorded_in_the_eval_manifest(judged):
    _, _, root = judged
    program = json.loads((root / "builtin" / "eval" / MANIFEST).read_text())
    rm = json.loads((root / "reward_model" / "eval" / MANIFEST).read_text())
    assert program["judge"] == {"judge": "builtin"}  # the task itself is data.train, in the recorded params
    assert rm["judge"]["judge"] == "reward_model" and rm["judge"]["source"] == str(root / "reward_model")
    assert "model.safetensors" in rm["judge"]["source_files"]  # its digests: a retrained judge is a new judge


@pytest.mark.parametrize(
    "change, named",
    [
        ({"prompts": "empty.jsonl"}, "evaluate.prompts=.*holds no prompts"),
        ({"judge": "reward_model", "judge_model": {"name_or_path": "base/model"}}, "not a sequence-classification"),
        ({"lm_eval": {"tasks": ["tiny_sentiment"], "include_path": "no_tasks_here"}}, "evaluate.lm_eval.include_path"),
    ],
)
def test_what_cannot_work_is_refused_before_any_model_is_loaded(trained, tmp_path, monkeypatch, change, named):
    params, root = trained
    (tmp_path / "empty.jsonl").write_text("")
    shutil.copytree(root / "base" / "model", tmp_path / "base" / "model")  # a causal LM, no reward model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "load_trained_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(PipelineError, match=named):
        evaluate(with_evaluate(params, **change), root, "refused")
    assert not (root / "refused" / "eval").exists()  # nothing written
