"""evaluate's two columns and its generations: the reference's own eval metrics beside the policy's, and greedy
generations of both on any data (judged only where a judge exists)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

import stages.evaluate as evaluate_stage
import stages.train as train_stage
from pipeline.publish.metrics_file import read_metrics
from pipeline.run.evaluation import evaluate_policy

DPO_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
}
MODEL_METRICS = ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


def trained(params: dict, root) -> None:
    train_stage.run(
        params, root / "tokenized", root / "ref_logps", root / "base", root / "train", root / "ck", root / "live"
    )


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """The built-in task trained at learning rate 0: the policy is still the reference."""
    from conftest import prepare_stages, tiny_params

    params = tiny_params(learning_rate=0.0, max_steps=1)
    root = tmp_path_factory.mktemp("untrained")
    prepare_stages(params, root, through="ref-logps")
    trained(params, root)
    return params, root


def test_the_reference_column_is_full_and_its_model_metrics_are_the_references(untrained, tmp_path):
    params, root = untrained
    result = evaluate_policy(
        params, root / "train", root / "tokenized", root / "ref_logps", root / "normalized", root / "base", tmp_path
    )
    ref = result.reference_metrics
    assert DPO_METRICS <= set(result.metrics) and DPO_METRICS <= set(ref)
    # the reference's implicit reward is 0 by definition; a tie is no correct pair; sigmoid's loss at 0 is log 2
    assert ref["rewards/chosen"] == ref["rewards/rejected"] == ref["rewards/margins"] == 0.0
    assert ref["rewards/accuracies"] == 0.0
    assert ref["loss"] == pytest.approx(math.log(2))
    # the policy is the reference here: what the reference pass measures is what the policy's pass measures
    for name in MODEL_METRICS:
        assert ref[name] == pytest.approx(result.metrics[name], rel=1e-4, abs=1e-6), name
    stored = pq.read_table(root / "ref_logps" / "eval.parquet")
    assert ref["logps/chosen"] == pytest.approx(np.mean(stored["ref_chosen_logps"].to_numpy()), rel=1e-4)
    assert ref["logps/rejected"] == pytest.approx(np.mean(stored["ref_rejected_logps"].to_numpy()), rel=1e-4)
    assert 0.0 < ref["mean_token_accuracy"] < 1.0 and ref["entropy"] > 0.0


def test_the_reference_column_is_full_with_an_online_reference(untrained, tmp_path):
    params, root = untrained
    params = {**params, "train": {**params["train"], "precompute_ref_log_probs": False}}
    result = evaluate_policy(
        params, root / "train", root / "tokenized", root / "ref_logps", root / "normalized", root / "base", tmp_path
    )
    assert DPO_METRICS <= set(result.reference_metrics)
    for name in MODEL_METRICS:
        assert result.reference_metrics[name] == pytest.approx(result.metrics[name], rel=1e-4, abs=1e-6), name


def test_the_reports_metrics_table_has_no_empty_reference_cell(untrained, tmp_path):
    params, root = untrained
    evaluate_stage.run(
        params,
        root / "train",
        root / "tokenized",
        root / "ref_logps",
        root / "normalized",
        root / "base",
        tmp_path / "eval",
        tmp_path / "eval.json",
        root / "live",
        tmp_path / "report.html",
    )
    table = re.search(r'<table id="metrics".*?</table>', (tmp_path / "report.html").read_text(), re.S).group(0)
    assert table.split("<tbody>")[1].count("<tr>") == len(DPO_METRICS) + 2  # + the judge's score and the win rate
    assert "–" not in table


def standard_rows(rows: list[dict]) -> list[dict]:
    """The built-in task's pairs as a user's own text data: standard format (prompt and completions as strings)."""
    return [
        {
            "prompt": r["prompt"][-1]["content"] + " ",
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in rows
    ]


@pytest.fixture(scope="module")
def user_data_run(tmp_path_factory):
    """A user's own data (a local file; no judge exists for it), the whole pipeline through evaluate."""
    from conftest import prepare_stages, tiny_params
    from pipeline.data.sources import builtin_rows

    params = tiny_params(max_steps=2)
    root = tmp_path_factory.mktemp("user_data")
    (root / "data").mkdir()
    for split in ("train", "eval"):
        rows = standard_rows(builtin_rows(params, split))
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params["data"].update({"train": str(root / "data" / "train.jsonl"), "eval": str(root / "data" / "eval.jsonl")})
    prepare_stages(params, root, through="ref-logps")
    trained(params, root)
    evaluate_stage.run(
        params,
        root / "train",
        root / "tokenized",
        root / "ref_logps",
        root / "normalized",
        root / "base",
        root / "eval",
        root / "results" / "eval.json",
        root / "live",
        root / "results" / "report.html",
    )
    return params, root


def test_user_data_gets_generations_without_a_judge(user_data_run):
    params, root = user_data_run
    metrics = read_metrics(root / "results" / "eval.json")
    lines = (root / "eval" / "generations.jsonl").read_text().splitlines()
    examples = [json.loads(line) for line in lines]
    assert len(examples) == metrics["num_generations"] == params["evaluate"]["num_generations"]
    unjudged = {"prompt", "policy", "reference", "prompt_index", "sample", "policy_length", "reference_length"}
    assert all(set(e) == unjudged for e in examples)  # no verdict, no score
    held_out = [json.loads(line)["prompt"] for line in (root / "data" / "eval.jsonl").read_text().splitlines()]
    assert [e["prompt"] for e in examples] == list(dict.fromkeys(held_out))[: len(examples)]  # text prompts, in order
    assert any(e["policy"] for e in examples) and any(e["reference"] for e in examples)
    assert "win_rate" not in metrics and "policy_mean_score" not in metrics and "unparsed_verdicts" not in metrics
    assert metrics["policy_mean_length"] > 0 and metrics["reference_mean_length"] > 0  # lengths need no judge
    page = (root / "results" / "report.html").read_text()
    section = re.search(r'<section id="generations">.*?</section>', page, re.S).group(0)
    assert "no judge" in section and examples[0]["prompt"].strip() in section


def test_user_data_has_a_full_reference_column(user_data_run):
    _, root = user_data_run
    table = re.search(r'<table id="metrics".*?</table>', (root / "results" / "report.html").read_text(), re.S).group(0)
    assert table.split("<tbody>")[1].count("<tr>") == len(DPO_METRICS) and "–" not in table
