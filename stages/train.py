"""dpo train: DPO on the tokenized pairs → artifacts/train (model, log history) + DVCLive curves in dvclive/; how
the run went (the checkpoint it resumed from, timings) is appended to artifacts/checkpoints/runs.jsonl."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import click

from pipeline.config.train_params import check_train
from pipeline.core.distributed import is_main
from pipeline.run.resume import record_run
from pipeline.run.tracking import LiveMetricsCallback
from pipeline.run.training import run_checkpoints, train_inputs, train_policy
from pipeline.store.artifacts import stage_output

from . import paths
from .common import launches, load, params_option, path_option, round_option, user_errors


def run(
    params: dict,
    tokenized: Path = paths.TOKENIZED,
    ref_logps: Path = paths.REF_LOGPS,
    base: Path = paths.BASE,
    out: Path = paths.TRAIN,
    checkpoints: Path = paths.CHECKPOINTS,
    live: Path = paths.LIVE,
    resume: str | bool | None = None,
    say=click.echo,
) -> dict:
    with stage_output("train", out, train_inputs(params, tokenized, ref_logps, base), params["train"]) as output:
        info = train_policy(
            params,
            tokenized,
            ref_logps,
            base,
            output.dir,
            checkpoints,
            callbacks=[LiveMetricsCallback(live)],
            resume=resume,
            say=say,
        )
        output.rows = info.pop("rows")
        how = info.pop("run")
        output.extra = info
    say(f"train: timings: {how['timings']}")
    # the artifact is in place: this run's checkpoints have served (they exist to survive interruptions)
    if is_main():
        shutil.rmtree(run_checkpoints(checkpoints, info["fingerprint"]), ignore_errors=True)
        record_run(
            checkpoints,
            {**how, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "artifact": str(out)},
        )
    return output.manifest


@click.command("train")
@params_option
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact.")
@path_option("ref-logps", paths.REF_LOGPS, "The reference log-probs (used when train.precompute_ref_log_probs).")
@path_option("base", paths.BASE, "The base artifact: the starting policy.")
@path_option("out", paths.TRAIN, "Where to write the trained model.")
@path_option(
    "checkpoints",
    paths.CHECKPOINTS,
    "Trainer checkpoints, one directory per run fingerprint (kept until the run succeeds, for resuming).",
)
@path_option("live", paths.LIVE, "The DVCLive directory: training curves (metrics.json, plots/).")
@click.option(
    "--resume",
    default=None,
    help="auto (continue this run's newest complete checkpoint, else start "
    "fresh), true (the same, but refuse a fresh start), false, or a "
    "checkpoint path. Default: train.resume.",
)
@round_option
@user_errors
@launches
def command(
    params_path: Path,
    tokenized: Path,
    ref_logps: Path,
    base: Path,
    out: Path,
    checkpoints: Path,
    live: Path,
    resume,
    round_name: str | None,
) -> None:
    """Train the policy with DPO (train.* params: any DPOConfig option; with --round, that round's train settings
    over them)."""
    params = load(params_path, check_train, round_name=round_name)
    manifest = run(params, tokenized, ref_logps, base, out, checkpoints, live, resume=resume)
    click.echo(f"train: {manifest['train_metrics']} -> {out}")
