"""dpo evaluate: DPO metrics on the held-out pairs (+ judged win rate on the built-in task)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.artifacts import stage_output, write_json
from pipeline.evaluation import evaluate_policy

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, train: Path = paths.TRAIN, tokenized: Path = paths.TOKENIZED, ref_logps: Path = paths.REF_LOGPS,
        normalized: Path = paths.NORMALIZED, base: Path = paths.BASE, out: Path = paths.EVAL,
        metrics_path: Path = paths.METRICS) -> dict:
    inputs = {"train": train, "tokenized": tokenized, "base": base}
    with stage_output("evaluate", out, inputs, {"evaluate": params["evaluate"], "train": params["train"]}) as output:
        metrics = evaluate_policy(params, train, tokenized, ref_logps, normalized, base, output.dir)
        output.rows = {"eval": metrics["num_pairs"]}
    write_json(metrics_path, metrics)
    return metrics


@click.command("evaluate")
@params_option
@path_option("train", paths.TRAIN, "The trained model artifact.")
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact (eval split).")
@path_option("ref-logps", paths.REF_LOGPS, "The reference log-probs.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact (held-out prompts for generation).")
@path_option("base", paths.BASE, "The base artifact: the reference for generation.")
@path_option("out", paths.EVAL, "Where to write per-example results.")
@path_option("metrics", paths.METRICS, "Where to write the metrics JSON.")
@user_errors
def command(params_path: Path, train: Path, tokenized: Path, ref_logps: Path, normalized: Path, base: Path, out: Path, metrics: Path) -> None:
    """Evaluate the trained policy on the eval split: DPO metrics, and the judged win rate on the built-in task."""
    result = run(load(params_path), train, tokenized, ref_logps, normalized, base, out, metrics)
    click.echo(json.dumps(result, indent=1))
