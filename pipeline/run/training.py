"""Training from the pipeline's artifacts: the stage's DPOConfig and the run (resuming per `pipeline.run.resume`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

from transformers import set_seed

from pipeline.config.train_params import dpo_config
from pipeline.core.faults import require_free_space, same_file_system
from pipeline.data.tables import load_pairs
from pipeline.model.loading import (
    is_peft_model,
    load_base_tokenizer,
    load_explicit_reference,
    load_policy,
    new_adapter_config,
)
from pipeline.run.resume import (
    CheckpointFingerprintCallback,
    plan_resume,
    resume_mode,
    resumed_name,
    run_checkpoints,
    run_fingerprint,
)
from pipeline.run.tracking import run_log, timings, without_timings
from pipeline.run.trainer import DPOTrainer

TRAINING_ARGS_NAME = "training_args.bin"  # a pickle that differs at every save: not part of the artifact


# ---- the run ------------------------------------------------------------------------------------------


def sort_peft_sets(model) -> None:
    """PEFT keeps resolved names (target_modules for all-linear) in sets, which adapter_config.json would list in
    an order that changes from process to process: make them sorted lists, so the file is the same bytes."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        for key, value in vars(config).items():
            if isinstance(value, (set, frozenset)):
                setattr(config, key, sorted(value))


def saved_bytes(model) -> tuple[int, int]:
    """(bytes the trained model takes saved, bytes of its trainable weights): an adapter saves only what trains.
    Partitioned weights (DeepSpeed ZeRO-3) count whole."""
    whole = trainable = 0
    for param in model.parameters():
        size = getattr(param, "ds_numel", param.numel()) * param.element_size()
        whole += size
        trainable += size if param.requires_grad else 0
    return (trainable if is_peft_model(model) else whole), trainable


def require_room(model, args, out_dir: Path, checkpoints: Path) -> None:
    """Refuse before the first step when the trained model, and one checkpoint (the model saved, two optimizer
    moments per trainable weight), cannot fit on the file systems they go to (`pipeline.core.faults`)."""
    model_bytes, trainable = saved_bytes(model)
    checkpoint = model_bytes + 2 * trainable if args.save_strategy != "no" else 0
    if checkpoint and not same_file_system(out_dir, checkpoints):
        require_free_space(checkpoints, checkpoint, "one training checkpoint")
        require_free_space(out_dir, model_bytes, "the trained model")
    else:
        what = "the trained model and one training checkpoint" if checkpoint else "the trained model"
        require_free_space(out_dir, model_bytes + checkpoint, what)


def train_inputs(params: dict, tokenized: Path, ref_logps: Path, base: Path) -> dict[str, Path]:
    """The input artifacts of the train stage, by kind: ref_logps only when the reference log-probs are precomputed."""
    inputs = {"tokenized": Path(tokenized), "base": Path(base)}
    if params["train"].get("precompute_ref_log_probs"):
        inputs["ref_logps"] = Path(ref_logps)
    return inputs


def finite_entry(entry: dict) -> dict:
    """A log entry as valid JSON: a NaN or infinite value becomes null, its key listed under `nonfinite`."""
    bad = sorted(k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v))
    return {**{k: (None if k in bad else v) for k, v in entry.items()}, **({"nonfinite": bad} if bad else {})}


def train_policy(
    params: dict,
    tokenized: Path,
    ref_logps: Path,
    base: Path,
    out_dir: Path,
    checkpoints: Path,
    callbacks: list,
    resume: str | bool | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Train the policy the base artifact names on the tokenized pairs; saves it to out_dir/model and the Trainer's
    log history (timings dropped) to out_dir/log_history.json. Checkpoints go under
    `run_checkpoints(checkpoints, fingerprint)`; a run resumes there according to `resume` (see `resume_mode`).
    Returns what the train manifest records, plus `rows` and how the run went (`run`: the checkpoint it resumed
    from, its timings: run-to-run facts kept out of the artifact, `pipeline.run.resume.record_run`)."""
    inputs = train_inputs(params, tokenized, ref_logps, base)
    fingerprint = run_fingerprint(params, inputs)
    run_dir = run_checkpoints(checkpoints, fingerprint)
    plan = plan_resume(resume_mode(params, resume), checkpoints, fingerprint)
    say(f"train: {plan.note}")
    args = dpo_config(params, run_dir, resume_from_checkpoint=None)
    ref_dir = ref_logps if "ref_logps" in inputs else None
    train_set = load_pairs(tokenized, "train", ref_dir)
    eval_set = load_pairs(tokenized, "eval", ref_dir) if args.eval_strategy != "no" else None
    tokenizer = load_base_tokenizer(base, params)
    # the policy: the base, or the base carrying the adapter to continue; a new adapter comes from peft_config
    model = load_policy(base, params)
    # the reference is resolved inside the trainer (`resolve_reference`): only an explicit one is loaded here
    ref_model = None if args.precompute_ref_log_probs else load_explicit_reference(base, params)
    set_seed(args.seed)  # a new adapter's initial weights are drawn in the constructor, before the Trainer seeds
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=new_adapter_config(params, base),
    )
    trainer.add_callback(CheckpointFingerprintCallback(fingerprint))  # last: after every other on_save
    if trainer.is_world_process_zero():  # checkpoints this run writes again: never mixed with their new files
        for stale in plan.discard:
            shutil.rmtree(stale, ignore_errors=True)
        require_room(trainer.model, args, out_dir, checkpoints)
    result = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)

    model_dir = Path(out_dir) / "model"
    sort_peft_sets(trainer.model)
    trainer.save_model(str(model_dir))  # process zero writes (every rank takes part under FSDP/ZeRO-3)
    history = [run_log(entry, trainer.state.log_history) for entry in trainer.state.log_history]
    if trainer.is_world_process_zero():
        (model_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # the params are in the manifest
        history = [finite_entry(entry) for entry in history]
        (Path(out_dir) / "log_history.json").write_text(
            json.dumps(history, indent=1, sort_keys=True, allow_nan=False) + "\n"
        )
    return {
        "train_metrics": run_log(without_timings(result.metrics), trainer.state.log_history),
        "fingerprint": fingerprint.digest,
        "adapter": is_peft_model(trainer.model),
        "rows": {"train": len(train_set)},
        "run": {
            "fingerprint": fingerprint.digest,
            "resumed_from": resumed_name(plan.checkpoint, checkpoints),
            "timings": timings(result.metrics),
        },
    }
