"""dpo train: DPO on the tokenized pairs → artifacts/train (model, log history) + DVCLive metrics."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from pipeline.artifacts import manifest_digest, read_manifest, staged_dir, write_manifest
from pipeline.base import load_base_tokenizer, load_explicit_reference, load_policy, peft_config
from pipeline.config import DPOConfig
from pipeline.data.tables import load_pairs
from pipeline.errors import PipelineError
from pipeline.models import is_peft_model
from pipeline.params import OWNED_ELSEWHERE, TRAIN_STAGE_KEYS
from pipeline.tracking import LiveMetricsCallback
from pipeline.trainer import DPOTrainer

from . import paths
from .common import load, params_option, path_option, user_errors


def training_config(params: dict, output_dir: Path, **overrides) -> DPOConfig:
    """The DPOConfig of a stage: params.yaml's train section over the stage's own settings."""
    train = {k: v for k, v in params["train"].items() if k not in TRAIN_STAGE_KEYS}
    # the data options as the tokenize/ref-logps stages applied them (the stage loads the models itself)
    owned = {key: params[section][name] for key, (section, name) in
             ((key, home.split(".")) for key, home in OWNED_ELSEWHERE.items()) if section != "model"}
    settings = {"report_to": "none", "save_total_limit": 2, "seed": params["seed"], "data_seed": params["seed"],
                **owned, **train, **overrides}
    try:
        return DPOConfig(output_dir=str(output_dir), **settings)
    except PipelineError:
        raise
    except (TypeError, ValueError) as err:  # TrainingArguments' own checks
        raise PipelineError(f"params: train: {err}") from None


def resume_point(params: dict, checkpoints: Path, resume: str | bool | None = None) -> str | bool | None:
    """What to resume from: the --resume option, else train.resume (else train.resume_from_checkpoint).

    True means the last checkpoint under `checkpoints` (none yet: start fresh); a path must be a checkpoint.
    """
    if resume is None:
        resume = params["train"].get("resume")
    if resume is None or resume is False:
        resume = params["train"].get("resume_from_checkpoint")
    if resume is True:  # the last checkpoint; none yet: start fresh
        from transformers.trainer_utils import get_last_checkpoint
        return get_last_checkpoint(str(checkpoints)) if Path(checkpoints).is_dir() else None
    if isinstance(resume, str) and not (Path(resume) / "trainer_state.json").exists():
        raise PipelineError(f"train.resume={resume!r}: not a Trainer checkpoint (no trainer_state.json there); give a "
                            f"checkpoint-N directory (e.g. under {checkpoints}) or true for the last one.")
    return resume or None


def run(params: dict, tokenized: Path = paths.TOKENIZED, ref_logps: Path = paths.REF_LOGPS, base: Path = paths.BASE,
        out: Path = paths.TRAIN, checkpoints: Path = paths.CHECKPOINTS, live: Path = paths.LIVE,
        resume: str | bool | None = None) -> dict:
    args = training_config(params, checkpoints)
    read_manifest(base, "base")
    ref_dir = ref_logps if args.precompute_ref_log_probs else None
    train_set = load_pairs(tokenized, "train", ref_dir)
    eval_set = load_pairs(tokenized, "eval", ref_dir) if args.eval_strategy != "no" else None
    tokenizer = load_base_tokenizer(base, params)
    resume = resume_point(params, checkpoints, resume)
    # the policy: the base, or the base carrying the adapter to continue; a new adapter comes from peft_config
    model = load_policy(base, params)
    ref_model = None if args.precompute_ref_log_probs else load_explicit_reference(base, params)
    with staged_dir(out) as tmp:
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                             processing_class=tokenizer, callbacks=[LiveMetricsCallback(tmp / "live")],
                             peft_config=peft_config(params))
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(tmp / "model"))
        (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        live_tmp = Path(str(live) + f".tmp-{os.getpid()}")  # metrics live beside the artifact (DVC metrics/plots)
        shutil.rmtree(live_tmp, ignore_errors=True)
        shutil.move(str(tmp / "live"), live_tmp)
        inputs = {"tokenized": manifest_digest(tokenized), "base": manifest_digest(base)}
        if ref_dir is not None:
            inputs["ref_logps"] = manifest_digest(ref_dir)
        manifest = write_manifest(tmp, "train", inputs=inputs, params=params["train"],
                                  rows={"train": len(train_set)},
                                  extra={"train_metrics": result.metrics, "resumed_from": str(resume) if resume else None,
                                         "adapter": is_peft_model(trainer.model)})
    shutil.rmtree(live, ignore_errors=True)
    os.replace(live_tmp, live)
    return manifest


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
