"""dpo train: DPO on the tokenized pairs → artifacts/train (model, log history) + DVCLive metrics."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from pipeline.artifacts import stage_output
from pipeline.tracking import LiveMetricsCallback
from pipeline.training import train_policy

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, tokenized: Path = paths.TOKENIZED, ref_logps: Path = paths.REF_LOGPS, base: Path = paths.BASE,
        out: Path = paths.TRAIN, checkpoints: Path = paths.CHECKPOINTS, live: Path = paths.LIVE,
        resume: str | bool | None = None) -> dict:
    inputs = {"tokenized": tokenized, "base": base}
    if params["train"].get("precompute_ref_log_probs"):
        inputs["ref_logps"] = ref_logps
    with stage_output("train", out, inputs, params["train"]) as output:
        info = train_policy(params, tokenized, ref_logps, base, output.dir, checkpoints,
                            callbacks=[LiveMetricsCallback(output.dir / "live")], resume=resume)
        output.rows = info.pop("rows")
        output.extra = info
        live_tmp = Path(str(live) + f".tmp-{os.getpid()}")  # metrics live beside the artifact (DVC metrics/plots)
        shutil.rmtree(live_tmp, ignore_errors=True)
        shutil.move(str(output.dir / "live"), live_tmp)
    shutil.rmtree(live, ignore_errors=True)
    os.replace(live_tmp, live)
    return output.manifest


@click.command("train")
@params_option
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact.")
@path_option("ref-logps", paths.REF_LOGPS, "The reference log-probs (used when train.precompute_ref_log_probs).")
@path_option("base", paths.BASE, "The base artifact: the starting policy.")
@path_option("out", paths.TRAIN, "Where to write the trained model.")
@path_option("checkpoints", paths.CHECKPOINTS, "Trainer checkpoints (kept between runs for resuming).")
@click.option("--resume", default=None, help="'true' for the last checkpoint, or a checkpoint path.")
@user_errors
def command(params_path: Path, tokenized: Path, ref_logps: Path, base: Path, out: Path, checkpoints: Path, resume) -> None:
    """Train the policy with DPO (train.* params: any DPOConfig option)."""
    if resume is not None and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    manifest = run(load(params_path), tokenized, ref_logps, base, out, checkpoints, resume=resume)
    click.echo(f"train: {manifest['train_metrics']} -> {out}")
