"""Training from the pipeline's artifacts: the stage's DPOConfig, where to resume, and the run itself."""

from __future__ import annotations

import json
from pathlib import Path

from .config import DPOConfig
from .data.tables import load_pairs
from .errors import PipelineError
from .models import is_peft_model, load_base_tokenizer, load_explicit_reference, load_policy, peft_config
from .params import TRAIN_STAGE_KEYS, dpo_options
from .trainer import DPOTrainer


def dpo_config(params: dict, output_dir: Path, **overrides) -> DPOConfig:
    """The DPOConfig of a stage: params.yaml's train section and the DPOConfig options other sections own
    (max_length from tokenize, ...), over the stage's own settings."""
    train = {k: v for k, v in params["train"].items() if k not in TRAIN_STAGE_KEYS}
    settings = {"report_to": "none", "save_total_limit": 2, "seed": params["seed"], "data_seed": params["seed"],
                **dpo_options(params), **train, **overrides}
    try:
        return DPOConfig(output_dir=str(output_dir), **settings)
    except PipelineError:
        raise
    except (TypeError, ValueError) as err:  # TrainingArguments' own checks
        raise PipelineError(f"params: train: {err}") from None


def resume_point(params: dict, checkpoints: Path, resume: str | bool | None = None) -> str | None:
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


def train_policy(params: dict, tokenized: Path, ref_logps: Path, base: Path, out_dir: Path, checkpoints: Path,
                 callbacks: list, resume: str | bool | None = None) -> dict:
    """Train the policy the base artifact names on the tokenized pairs; saves it to out_dir/model and the
    Trainer's log history to out_dir/log_history.json. Returns what the train manifest records."""
    args = dpo_config(params, checkpoints)
    ref_dir = ref_logps if args.precompute_ref_log_probs else None
    train_set = load_pairs(tokenized, "train", ref_dir)
    eval_set = load_pairs(tokenized, "eval", ref_dir) if args.eval_strategy != "no" else None
    tokenizer = load_base_tokenizer(base, params)
    resume = resume_point(params, checkpoints, resume)
    # the policy: the base, or the base carrying the adapter to continue; a new adapter comes from peft_config
    model = load_policy(base, params)
    # the reference is resolved inside the trainer (`resolve_reference`): only an explicit one is loaded here
    ref_model = None if args.precompute_ref_log_probs else load_explicit_reference(base, params)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config(params))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(Path(out_dir) / "model"))
    (Path(out_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return {"train_metrics": result.metrics, "resumed_from": str(resume) if resume else None,
            "adapter": is_peft_model(trainer.model), "rows": {"train": len(train_set)}}
