"""dpo evaluate: DPO metrics on the held-out pairs, judged generations (evaluate.judge), the lm-evaluation-harness
regression check, and the run report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.config.train_params import check_train
from pipeline.core.distributed import is_main
from pipeline.core.environment import environment
from pipeline.publish.metrics_file import write_metrics
from pipeline.publish.report import write_report
from pipeline.run.evaluation import evaluate_policy
from pipeline.store.artifacts import stage_output

from . import paths
from .common import launches, load, params_option, path_option, round_option, user_errors


def run(
    params: dict,
    train: Path = paths.TRAIN,
    tokenized: Path = paths.TOKENIZED,
    ref_logps: Path = paths.REF_LOGPS,
    normalized: Path = paths.NORMALIZED,
    base: Path = paths.BASE,
    out: Path = paths.EVAL,
    metrics_path: Path = paths.METRICS,
    live: Path = paths.LIVE,
    report: Path | None = None,
    versus: Path | None = None,
) -> dict:
    """Evaluate; the report goes to `report` (default: report.html beside the metrics file); with `versus` (a base
    artifact), the answers are also judged against that model's (figures `versus/...`)."""
    inputs = {"train": train, "tokenized": tokenized, "normalized": normalized, "base": base}
    if params["train"].get("precompute_ref_log_probs"):
        inputs["ref_logps"] = ref_logps
    used = {"evaluate": params["evaluate"], "train": params["train"]}
    aside = {"versus": ("base", Path(versus))} if versus is not None else None
    with stage_output("evaluate", out, inputs, used, aside=aside) as output:
        result = evaluate_policy(params, train, tokenized, ref_logps, normalized, base, output.dir, versus)
        output.rows = {"eval": result.metrics["num_pairs"]}
        output.extra["judge"] = result.judge  # which judge, and its model's identity: a changed judge re-runs
    if is_main():
        write_metrics(metrics_path, result.metrics, environment())  # where it ran, beside the metrics
        write_report(report or Path(metrics_path).with_name("report.html"), result, live, params)
    return result.metrics


@click.command("evaluate")
@params_option
@path_option("train", paths.TRAIN, "The trained model artifact.")
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact (eval split).")
@path_option("ref-logps", paths.REF_LOGPS, "The reference log-probs.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact (held-out prompts, the pairs' text).")
@path_option("base", paths.BASE, "The base artifact: the reference for generation.")
@path_option("out", paths.EVAL, "Where to write per-example results.")
@path_option("metrics", paths.METRICS, "Where to write the metrics JSON (tracked by git; DVC metrics).")
@path_option("live", paths.LIVE, "The training run's DVCLive directory (curves for the report).")
@path_option("report", paths.REPORT, "Where to write the HTML run report.")
@click.option(
    "--versus",
    type=click.Path(path_type=Path),
    default=None,
    help="A base artifact: also judge the policy's answers against this model's (figures under versus/). With "
    "--round and iterate.reference initial, the round's own base (the round before) is used instead.",
)
@round_option
@user_errors
@launches
def command(
    params_path: Path,
    train: Path,
    tokenized: Path,
    ref_logps: Path,
    normalized: Path,
    base: Path,
    out: Path,
    metrics: Path,
    live: Path,
    report: Path,
    versus: Path | None,
    round_name: str | None,
) -> None:
    """Evaluate the trained policy on the eval split: DPO metrics, the answers of policy and reference to held-out
    prompts judged into a win rate (evaluate.judge), optional lm-evaluation-harness tasks, and a self-contained HTML
    report of the run."""
    params = load(params_path, check_train, round_name=round_name)
    if round_name is not None and params["iterate"]["reference"] == "initial":
        versus = base  # the round's reference is the initial model: the other comparison is the round's start
    result = run(params, train, tokenized, ref_logps, normalized, base, out, metrics, live, report, versus)
    click.echo(json.dumps(result, indent=1))
    click.echo(f"report: {report}")
