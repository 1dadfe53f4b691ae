"""Trustworthy resume: the run's fingerprint, its checkpoints, and which one (if any) a run continues from.

Checkpoints live under `<checkpoints>/<fingerprint[:16]>/checkpoint-N`, where the fingerprint digests everything
that determines the trained model (seed, the train params that change it, the model-loading params, the
identities of the input artifacts). A checkpoint counts as complete once its `fingerprint.json` is written,
after the Trainer (and every other callback) has finished saving it. `train.resume`: `auto` continues from the
newest complete checkpoint of the same fingerprint (else starts fresh, saying why), `true` refuses when there is
none, `false` starts fresh, a path must be a checkpoint of this very run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from transformers import TrainerCallback

from pipeline.config.params import OWNED_ELSEWHERE, TRAIN_STAGE_DEFAULTS
from pipeline.config.train_params import dpo_config
from pipeline.core.errors import PipelineError
from pipeline.core.integrity import files_problem
from pipeline.store.artifacts import manifest_digest, write_json

FINGERPRINT_NAME = "fingerprint.json"
TRAINER_STATE_NAME = "trainer_state.json"
INCOMPLETE = "no fingerprint.json or trainer_state.json: killed while saving?"

# DPOConfig options that cannot change the trained model (the rest, conservatively, all can): where it writes
# and resumes from, how often it logs and saves, progress bars, reporting, data-loading workers, the Hub.
# (train.resume is the stage's own key, never a DPOConfig option.)
UNFINGERPRINTED_TRAIN_KEYS = frozenset(
    {
        "output_dir",
        "local_rank",
        "resume_from_checkpoint",
        "max_nonfinite_steps",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "disable_tqdm",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "skip_memory_metrics",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_on_each_node",
        "dataloader_num_workers",
        "dataloader_prefetch_factor",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "dataloader_multiprocessing_context",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
    }
)
# how evaluation batches and gathers: no effect on training unless the best checkpoint is kept at the end
# (when evaluation runs does count: each eval dataloader draws from the RNG, which dropout then sees)
EVAL_ONLY_TRAIN_KEYS = frozenset(
    {
        "per_device_eval_batch_size",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "batch_eval_metrics",
        "include_for_metrics",
        "prediction_loss_only",
    }
)
# model.* keys that change how the policy and reference are loaded (the rest are in the base artifact's identity)
FINGERPRINTED_MODEL_KEYS = (
    "peft",
    "model_init_kwargs",
    "ref_model_init_kwargs",
    "attn_implementation",
    "quantization",
    "trust_remote_code",
)


# ---- the fingerprint ----------------------------------------------------------------------------------


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    record: dict  # what determines the run, as JSON
    digest: str  # sha256 of the record's canonical JSON

    @property
    def short(self) -> str:
        return self.digest[:16]

    @classmethod
    def of(cls, record: dict) -> "Fingerprint":
        record = json.loads(canonical_json(record))  # plain JSON values, as a fingerprint.json reads back
        return cls(record, hashlib.sha256(canonical_json(record).encode()).hexdigest())


def fingerprinted_train_values(params: dict) -> dict:
    """The DPOConfig values of the run (defaults included, so `beta: 0.1` and no beta are the same run) that can
    change the trained model. Options other sections own are left to those: the model.* keys and the inputs."""
    args = dpo_config(params, "unused")
    values = args.to_dict()
    values.update({k: getattr(args, k) for k in values if k.endswith("_token")})  # to_dict masks them (pad_token)
    excluded = (
        UNFINGERPRINTED_TRAIN_KEYS
        | set(OWNED_ELSEWHERE)
        | (set() if args.load_best_model_at_end else EVAL_ONLY_TRAIN_KEYS)
    )
    return {k: v for k, v in sorted(values.items()) if k not in excluded}


def run_fingerprint(params: dict, inputs: dict[str, Path]) -> Fingerprint:
    """The fingerprint of a train run: seed, the train values that change the model, the model-loading params,
    the identities (manifest digests) of the input artifacts (`inputs`: artifact kind → directory) and the number
    of processes when more than one."""
    record = {
        "seed": params["seed"],
        "train": fingerprinted_train_values(params),
        "model": {k: params["model"][k] for k in FINGERPRINTED_MODEL_KEYS},
        "inputs": {kind: manifest_digest(path) for kind, path in sorted(inputs.items())},
    }
    processes = params["distributed"]["num_processes"] * params["distributed"]["num_machines"]
    if processes > 1:  # the global batch and each rank's data and RNG state depend on it (one process: unchanged)
        record["processes"] = processes
    return Fingerprint.of(record)


def _flat(record: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"beta": 0.1}} → {"train.beta": 0.1}: the keys as params.yaml spells them."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_UNSET = object()


def _shown(key: str, value) -> str:
    if value is _UNSET:
        return "(unset)"
    if key.startswith("inputs.") and isinstance(value, str):
        return value[:12]
    return json.dumps(value, default=str)


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two fingerprint records, one 'key: old → new' per key (inputs by digest)."""
    old, new = _flat(recorded), _flat(current)
    return [
        f"{key}: {_shown(key, old.get(key, _UNSET))} → {_shown(key, new.get(key, _UNSET))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, _UNSET) != new.get(key, _UNSET)
    ]


class CheckpointFingerprintCallback(TrainerCallback):
    """Writes `fingerprint.json` into each checkpoint once it is saved: the mark of a complete checkpoint.

    Add it after every other callback that saves into checkpoints (the trainer's own are added in its constructor).
    """

    def __init__(self, fingerprint: Fingerprint):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_json(
                checkpoint / FINGERPRINT_NAME,
                {"fingerprint": self.fingerprint.digest, "record": self.fingerprint.record},
            )


# ---- where to resume ----------------------------------------------------------------------------------


def run_checkpoints(checkpoints: Path, fingerprint: Fingerprint | str) -> Path:
    """The directory of one run's checkpoints."""
    digest = fingerprint.digest if isinstance(fingerprint, Fingerprint) else fingerprint
    return Path(checkpoints) / digest[:16]


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def read_fingerprint(checkpoint: Path) -> dict | None:
    """A checkpoint's fingerprint.json, if it is complete (Trainer state and fingerprint both there and sound)."""
    checkpoint = Path(checkpoint)
    try:
        recorded = json.loads((checkpoint / FINGERPRINT_NAME).read_text())
        intact = Fingerprint.of(recorded["record"]).digest == recorded["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if intact and (checkpoint / TRAINER_STATE_NAME).is_file() else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint's files cannot be loaded (None: they can), checked as cheaply as resuming reads them
    (`pipeline.core.integrity.files_problem`); `training_args.bin`, which resuming never reads, is left alone."""
    return files_problem(checkpoint, skip=("training_args.bin",))


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0] if run_dir.is_dir() else []
    return sorted(found, key=_step)


@dataclasses.dataclass
class ResumePlan:
    checkpoint: Path | None  # None: start fresh
    note: str  # one line saying what was chosen and why
    discard: list[Path]  # checkpoints of this run that training would write again: removed before it starts


def resume_mode(params: dict, resume: str | bool | None = None) -> str | bool:
    """The resume setting: the --resume option, else train.resume, else train.resume_from_checkpoint, else auto.
    Returns True, False, "auto" or a checkpoint path."""
    for value in (resume, params["train"].get("resume"), params["train"].get("resume_from_checkpoint")):
        if value is None:
            continue
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
            value = {"true": True, "false": False, "auto": "auto"}[value.strip().lower()]
        return value
    return TRAIN_STAGE_DEFAULTS["resume"]


def _describe_others(checkpoints: Path, run_dir: Path, fingerprint: Fingerprint) -> list[str]:
    """Other fingerprints' checkpoint directories, each with what differs from this run."""
    others = []
    for directory in sorted(p for p in Path(checkpoints).iterdir() if p.is_dir() and p != run_dir):
        recorded = next((r for r in map(read_fingerprint, reversed(list_checkpoints(directory))) if r), None)
        if recorded is None:
            continue
        differences = fingerprint_differences(recorded["record"], fingerprint.record)
        others.append(f"{directory.name} ({'; '.join(differences[:3])}{'; …' if len(differences) > 3 else ''})")
    return others


def plan_resume(mode: str | bool, checkpoints: Path, fingerprint: Fingerprint) -> ResumePlan:
    """Where a run of `fingerprint` starts, given the resume mode (True, False, "auto" or a checkpoint path)."""
    checkpoints = Path(checkpoints)
    run_dir = run_checkpoints(checkpoints, fingerprint)
    existing = list_checkpoints(run_dir)
    if mode is False:
        names = ", ".join(p.name for p in existing)
        removed = f"; removing this run's earlier checkpoints ({names})" if existing else ""
        return ResumePlan(None, f"train.resume=false: starting fresh{removed}", existing)
    if mode not in (True, "auto"):
        return _plan_from_path(Path(mode), run_dir, existing, fingerprint)

    matching = [p for p in existing if (read_fingerprint(p) or {}).get("fingerprint") == fingerprint.digest]
    damaged: dict[Path, str] = {}
    for candidate in reversed(matching):  # the newest whose files load; older ones are checked only when needed
        problem = checkpoint_problem(candidate)
        if problem is None:
            break
        damaged[candidate] = problem
    complete = [p for p in matching if p not in damaged]
    incomplete = [p for p in existing if p not in matching]
    names = ", ".join(p.name for p in incomplete)
    broken = "; ".join(f"{p.name}: {problem}" for p, problem in damaged.items())
    if complete:
        chosen = complete[-1]
        skipped = f"; skipping incomplete checkpoint(s) {names} ({INCOMPLETE}; removed)" if incomplete else ""
        skipped += f"; skipping damaged checkpoint(s) ({broken}; removed)" if damaged else ""
        return ResumePlan(
            chosen,
            f"train.resume={_mode_name(mode)}: resuming from {fingerprint.short}/{chosen.name}{skipped}",
            [p for p in existing if p not in complete or _step(p) > _step(chosen)],
        )
    if damaged:
        reason = (
            f"every checkpoint of this run's fingerprint {fingerprint.short} is damaged or incomplete ({broken}"
            + (f"; incomplete: {names}" if names else "")
            + ")"
        )
        if mode == "auto":
            reason += "; they are removed"
    elif incomplete:
        reason = f"only incomplete checkpoints of this run's fingerprint {fingerprint.short}: {names} ({INCOMPLETE})"
        if mode == "auto":
            reason += "; they are removed"
    else:
        others = _describe_others(checkpoints, run_dir, fingerprint) if checkpoints.is_dir() else []
        reason = (
            f"no checkpoint of this run's fingerprint {fingerprint.short}; checkpoints exist for other "
            f"configs: {', '.join(others)}"
            if others
            else f"no checkpoints at all under {checkpoints}"
        )
    if mode is True:
        raise PipelineError(
            f"params: train.resume=true but there is nothing to resume: {reason}. Set train.resume: "
            f"auto (or false, or --resume auto) to start fresh, or give a checkpoint path."
        )
    return ResumePlan(None, f"train.resume=auto: {reason}; starting fresh", existing)


def _mode_name(mode) -> str:
    return "true" if mode is True else str(mode)


def _plan_from_path(checkpoint: Path, run_dir: Path, existing: list[Path], fingerprint: Fingerprint) -> ResumePlan:
    where = f"train.resume={str(checkpoint)!r}"
    if not (checkpoint / TRAINER_STATE_NAME).exists():
        raise PipelineError(
            f"{where}: not a Trainer checkpoint (no {TRAINER_STATE_NAME} there); give a checkpoint-N "
            f"directory (e.g. under {run_dir}) or set train.resume: auto."
        )
    recorded = read_fingerprint(checkpoint)
    if recorded is None:
        raise PipelineError(
            f"{where}: no readable {FINGERPRINT_NAME} there, so it is incomplete (killed while "
            f"saving) or not from this pipeline's train stage and cannot be checked against this run; "
            f"give another checkpoint-N or set train.resume: auto."
        )
    if recorded["fingerprint"] != fingerprint.digest:
        differences = fingerprint_differences(recorded["record"], fingerprint.record)
        raise PipelineError(
            f"{where}: that checkpoint was made for other params or inputs ({'; '.join(differences)}); "
            f"resuming it would not give this run. Restore those values, or set train.resume: auto "
            f"to start this run fresh."
        )
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise PipelineError(
            f"{where}: that checkpoint is damaged: {problem}; give another checkpoint-N or set "
            f"train.resume: auto (it resumes from the newest checkpoint that loads, or starts fresh)."
        )
    resolved = checkpoint.resolve()
    discard = [
        p for p in existing if p.resolve() != resolved and (_step(p) > _step(checkpoint) or not read_fingerprint(p))
    ]
    return ResumePlan(checkpoint, f"{where}: resuming from {checkpoint}", discard)


def resumed_name(checkpoint: Path | None, checkpoints: Path) -> str | None:
    """How the manifest names the checkpoint a run resumed from: relative to the checkpoints directory."""
    if checkpoint is None:
        return None
    try:
        return Path(checkpoint).resolve().relative_to(Path(checkpoints).resolve()).as_posix()
    except ValueError:
        return str(checkpoint)


# ---- how a run got its result: outside the cached artifact ------------------------------------------------

RUNS_NAME = "runs.jsonl"  # under the checkpoints directory: one line per finished train run


def record_run(checkpoints: Path, record: dict) -> None:
    """Append how a finished run got its result (the checkpoint it resumed from, its timings, when it finished) to
    `<checkpoints>/runs.jsonl`. Not in the train artifact: a resumed run's artifact is the uninterrupted one's bytes,
    so DVC sees no change downstream."""
    path = Path(checkpoints) / RUNS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def last_run(checkpoints: Path) -> dict | None:
    """The newest record of `record_run` (None when no run finished here, or the file is damaged)."""
    try:
        lines = (Path(checkpoints) / RUNS_NAME).read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
