"""The whole staged pipeline on the built-in task at test size, through the stage functions."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

import stages.base as base_stage
import stages.evaluate as evaluate_stage
import stages.export as export_stage
import stages.normalize as normalize_stage
import stages.ref_logps as ref_stage
import stages.tokenize as tokenize_stage
import stages.train as train_stage
from pipeline.core.errors import PipelineError
from pipeline.publish.metrics_file import flatten, read_metrics
from pipeline.store.artifacts import MANIFEST, SCHEMA_VERSION, manifest_digest

METRIC_NAMES = {
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


def run_all(params, root):
    p = {
        name: root / name
        for name in ("base", "normalized", "tokenized", "ref_logps", "train", "checkpoints", "live", "eval", "export")
    }
    p["metrics"] = root / "results" / "eval.json"
    p["report"] = root / "results" / "report.html"
    base_stage.run(params, p["base"])
    normalize_stage.run(params, p["normalized"])
    tokenize_stage.run(params, p["normalized"], p["base"], p["tokenized"])
    ref_stage.run(params, p["tokenized"], p["base"], p["ref_logps"])
    train_stage.run(params, p["tokenized"], p["ref_logps"], p["base"], p["train"], p["checkpoints"], p["live"])
    evaluate_stage.run(
        params,
        p["train"],
        p["tokenized"],
        p["ref_logps"],
        p["normalized"],
        p["base"],
        p["eval"],
        p["metrics"],
        p["live"],
        p["report"],
    )
    export_stage.run(params, p["train"], p["normalized"], p["base"], p["metrics"], p["export"])
    return p


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from conftest import tiny_params

    params = tiny_params()
    return params, run_all(params, tmp_path_factory.mktemp("run"))


def test_every_stage_writes_a_manifest_last_and_counts_add_up(pipeline_run):
    params, p = pipeline_run
    for name in ("base", "normalized", "tokenized", "ref_logps", "train", "eval", "export"):
        manifest = json.loads((p[name] / MANIFEST).read_text())
        assert manifest["schema_version"] == SCHEMA_VERSION
        for rel, digest in manifest["files"].items():
            assert (p[name] / rel).exists(), f"{name}: manifest lists missing {rel}"
    report = json.loads((p["normalized"] / "report.json").read_text())
    assert report["rows_read"] == sum(report["rows_written"].values()) + report["rows_dropped"]
    assert report["rows_written"] == {"train": 48, "eval": 16}
    tokenized = pq.read_table(p["tokenized"] / "train.parquet")
    ref = pq.read_table(p["ref_logps"] / "train.parquet")
    assert sorted(tokenized.column("row_id").to_pylist()) == sorted(ref.column("row_id").to_pylist())
    ref_manifest = json.loads((p["ref_logps"] / MANIFEST).read_text())
    assert ref_manifest["inputs"]["tokenized"] == {
        "digest": manifest_digest(p["tokenized"]),
        "path": str(p["tokenized"]),
    }


def test_reference_logps_match_per_token_sums(pipeline_run):
    _, p = pipeline_run
    for row in pq.read_table(p["ref_logps"] / "eval.parquet").to_pylist():
        assert row["ref_chosen_logps"] == pytest.approx(sum(row["ref_chosen_token_logps"]), abs=1e-4)
        assert row["ref_chosen_logps"] < 0 and row["ref_rejected_logps"] < 0


def test_training_logs_documented_metrics_for_dvc(pipeline_run):
    _, p = pipeline_run
    live = json.loads((p["live"] / "metrics.json").read_text())
    names = {k.removeprefix("train/") for k in flatten(live) if k.startswith("train/")}
    assert METRIC_NAMES | {"num_tokens", "learning_rate", "grad_norm", "epoch", "loss"} <= names
    assert live["step"] == 6  # the last optimizer step: points sit at the step they describe
    history = (p["live"] / "plots" / "metrics" / "train" / "rewards" / "accuracies.tsv").read_text().splitlines()
    assert history[0].split("\t") == ["step", "accuracies"] and [r.split("\t")[0] for r in history[1:]] == [
        "2",
        "4",
        "6",
    ]
    assert (p["train"] / "model" / "config.json").exists()


def test_evaluate_writes_metrics_per_example_and_win_rate(pipeline_run):
    _, p = pipeline_run
    metrics = read_metrics(p["metrics"])
    assert json.loads(p["metrics"].read_text())["rewards"]["accuracies"] == metrics["rewards/accuracies"]  # nested
    assert METRIC_NAMES | {"loss", "win_rate", "num_pairs"} <= set(metrics)
    assert 0.0 <= metrics["win_rate"] <= 1.0 and metrics["num_pairs"] == 16
    per_example = pq.read_table(p["eval"] / "per_example.parquet").to_pylist()
    assert len(per_example) == 16
    accuracy = sum(r["correct"] for r in per_example) / len(per_example)
    assert accuracy == pytest.approx(metrics["rewards/accuracies"])
    assert all(r["prompt"] and r["chosen"] and r["rejected"] for r in per_example)  # the pairs' text, for reading
    page = p["report"].read_text()
    assert "win rate" in page and page.count("<svg") >= 4 and per_example[0]["row_id"] in page


def test_export_loads_with_transformers_and_has_a_model_card(pipeline_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, p = pipeline_run
    model = AutoModelForCausalLM.from_pretrained(p["export"])
    tokenizer = AutoTokenizer.from_pretrained(p["export"])
    assert model.config.num_hidden_layers == 1 and tokenizer.eos_token == "<|end|>"
    assert list(p["export"].glob("*.safetensors"))
    card = (p["export"] / "README.md").read_text()
    assert "sigmoid" in card and "rewards/accuracies" in card and "builtin:tiny-llama" in card
    metadata = yaml.safe_load(card.split("---\n")[1])  # the built-in base is no Hub id: no base_model there
    assert "base_model" not in metadata and "- Base model: dpo-pipeline's built-in model `builtin:tiny-llama`" in card


def test_stale_reference_logps_are_refused(pipeline_run, tmp_path):
    """ref-logps computed for other tokenized data: train refuses and names the stage to re-run."""
    import shutil

    params, p = pipeline_run
    other = dict(params, tokenize={**params["tokenize"], "max_length": 30})
    tokenized2 = tmp_path / "tokenized"
    tokenize_stage.run(other, p["normalized"], p["base"], tokenized2)
    with pytest.raises(PipelineError, match=r"stale.*dpo ref-logps"):
        train_stage.run(
            params, tokenized2, p["ref_logps"], p["base"], tmp_path / "train", tmp_path / "ck", tmp_path / "live"
        )
    assert not (tmp_path / "train").exists()
    broken = tmp_path / "no_manifest"
    shutil.copytree(p["tokenized"], broken)
    (broken / MANIFEST).unlink()
    with pytest.raises(PipelineError, match=r"no manifest.json.*dpo tokenize"):
        ref_stage.run(params, broken, p["base"], tmp_path / "ref")


def test_online_reference_training_matches_the_precomputed_route(pipeline_run, tmp_path):
    """train.precompute_ref_log_probs false: the reference is computed on the fly; the first logged
    rewards are those of the precomputed route (same data order, same seed)."""
    from conftest import tiny_params

    _, p = pipeline_run
    results = {}
    for precompute in (True, False):
        params = tiny_params(precompute_ref_log_probs=precompute, max_steps=2, logging_steps=1, learning_rate=0.0)
        out = tmp_path / str(precompute)
        manifest = train_stage.run(
            params, p["tokenized"], p["ref_logps"], p["base"], out / "train", out / "ck", out / "live"
        )
        history = json.loads((out / "train" / "log_history.json").read_text())
        results[precompute] = history[0]
        assert ("ref_logps" in manifest["inputs"]) == precompute
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "loss"):
        assert results[True][name] == pytest.approx(results[False][name], abs=1e-4)
    assert results[True]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # learning_rate 0: policy == reference
