"""What a sweep trains, as pure functions: its configurations (the grid's combinations and the listed ones), each
configuration's params, where its chunks end, and who survives a rung of successive halving.

A configuration is a flat mapping of overrides, `{"train.beta": 0.5, "model.peft.r": 8}`, applied over params.yaml.
A chunk is one n-th of a configuration's optimizer steps, in the order an uninterrupted run takes them: chunk j of
`chunks` ends at step `j * total // chunks`, so the last ends with the run.
"""

from __future__ import annotations

import copy
import itertools
import math

from pipeline.config.params import SWEEP_METRICS, TRAIN_KEYS, PeftParams, check_params, did_you_mean
from pipeline.config.train_params import check_train
from pipeline.core.errors import PipelineError

# what a sweep may vary: the train section's settings and the shape of a new LoRA adapter; everything else (the
# model, the data, tokenization, the reference pass) is the cached base/tokenize/ref-logps the sweep trains on
PEFT_PREFIX = "model.peft."
TRAIN_PREFIX = "train."
NOT_SWEPT = {"train.resume": "the sweep resumes each configuration itself"}
# settings that change how many steps a run takes or which pairs each step sees: a clone continues its parent's
# steps, so it keeps these (a warm start is a fresh run and may change them)
STEP_KEYS = (
    "train.num_train_epochs",
    "train.max_steps",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.seed",
    "train.data_seed",
)


def check_key(key: str, where: str) -> None:
    """Refuse a key a sweep cannot vary, naming it (`where`: e.g. "sweep.grid") and what it may be."""
    name = str(key)
    if name in NOT_SWEPT:
        raise PipelineError(f"params: {where}: {name} cannot be swept ({NOT_SWEPT[name]}); remove it.")
    if name.startswith(TRAIN_PREFIX) and name.removeprefix(TRAIN_PREFIX) in TRAIN_KEYS:
        return
    peft_keys = {f"{PEFT_PREFIX}{k}" for k in PeftParams.__dataclass_fields__}
    if name in peft_keys:
        return
    valid = {f"{TRAIN_PREFIX}{k}" for k in TRAIN_KEYS} | peft_keys
    raise PipelineError(
        f"params: {where}: unknown key {name}{did_you_mean(name, valid)}; a sweep varies train.<option> (any "
        f"DPOConfig option) or {PEFT_PREFIX}<key> (the LoRA adapter), written in full, e.g. train.beta."
    )


def grid_configurations(grid: dict) -> list[dict]:
    """Every combination of the grid's values, in the grid's key order (the last key varies fastest)."""
    for key, values in grid.items():
        check_key(key, "sweep.grid")
        if not isinstance(values, list) or len(values) < 2:
            shown = values if not isinstance(values, list) else f"{len(values)} value{'s' * (len(values) != 1)}"
            raise PipelineError(
                f"params: sweep.grid.{key} has {shown}; a grid key lists two or more values to compare (a single "
                f"value belongs in params.yaml itself, e.g. {key.split('.', 1)[0]}: {{{key.split('.', 1)[1]}: ...}})."
            )
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else []


def sweep_configurations(sweep: dict) -> list[dict]:
    """The sweep's configurations: the grid's combinations, then sweep.configurations; duplicates refused."""
    configurations = grid_configurations(sweep["grid"])
    for i, extra in enumerate(sweep["configurations"]):
        if not isinstance(extra, dict) or not extra:
            raise PipelineError(
                f"params: sweep.configurations[{i}] must be a non-empty mapping of key → value, got {extra!r}."
            )
        for key in extra:
            check_key(key, f"sweep.configurations[{i}]")
        configurations.append(dict(extra))
    if len(configurations) < 2:
        raise PipelineError(
            "params: the sweep has "
            + ("no configuration" if not configurations else "one configuration")
            + "; give sweep.grid two or more values of a setting (or list sweep.configurations), e.g. "
            "sweep: {grid: {train.beta: [0.1, 0.5]}}."
        )
    seen: dict[str, int] = {}
    for i, overrides in enumerate(configurations):
        key = repr(sorted(overrides.items(), key=lambda kv: kv[0]))
        if key in seen:
            raise PipelineError(
                f"params: sweep: configurations {seen[key] + 1} and {i + 1} are the same ({overrides}); remove one."
            )
        seen[key] = i
    return configurations


def set_dotted(tree: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = tree
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def configuration_params(params: dict, overrides: dict, where: str) -> dict:
    """params.yaml's params with a configuration's overrides, checked as the train stage checks its params (the
    train section against DPOConfig); an error names the configuration (`where`)."""
    raw = copy.deepcopy(params)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    try:
        return check_train(check_params(raw))
    except PipelineError as err:
        raise PipelineError(f"{where}: {err}") from None


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps per epoch, as the Trainer counts them: batches (the last may be short), accumulated."""
    batches = math.ceil(rows / batch_size)
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def total_steps(rows: int, args) -> int:
    """The optimizer steps of a whole run of `args` (a DPOConfig) over `rows` training pairs, in one process."""
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = steps_per_epoch(rows, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    return math.ceil(args.num_train_epochs * per_epoch)


def chunk_bounds(total: int, chunks: int) -> list[int]:
    """The step at which each chunk ends: [total // chunks, 2 * total // chunks, ..., total]."""
    return [j * total // chunks for j in range(1, chunks + 1)]


def check_chunks(total: int, chunks: int, where: str) -> None:
    if chunks > total:
        raise PipelineError(
            f"params: sweep.chunks is {chunks}, but {where} takes only {total} optimizer step"
            f"{'s' * (total != 1)}, so some chunks would be empty; set sweep.chunks to at most {total} (or train "
            "longer: train.num_train_epochs)."
        )


def rung_due(chunk: int, sweep: dict) -> bool:
    """Whether configurations that have just trained `chunk` chunks are ranked now (never after the last chunk:
    everything left there has finished)."""
    return (
        sweep["eta"] > 1
        and chunk < sweep["chunks"]
        and chunk >= sweep["min_chunks"]
        and (chunk - sweep["min_chunks"]) % sweep["rung_chunks"] == 0
    )


def ranked(metrics: dict[str, dict], metric: str) -> list[str]:
    """Run names best first by `metric` of each run's eval metrics (`metrics`: name → {metric: value}); a missing
    or NaN value ranks last. Ties go to the lower eval loss (a judged win rate is often tied at a chunk boundary:
    greedy answers change all at once), then to the name."""
    higher = SWEEP_METRICS[metric]

    def value(run: dict, name: str, sign: float) -> tuple[bool, float]:
        v = run.get(name)
        bad = v is None or not math.isfinite(v)
        return bad, 0.0 if bad else sign * v

    def key(name):
        run = metrics[name]
        return (*value(run, metric, -1.0 if higher else 1.0), *value(run, "loss", 1.0), name)

    return sorted(metrics, key=key)


def survivors(metrics: dict[str, dict], metric: str, eta: int) -> list[str]:
    """Successive halving: the best ceil(n / eta) of the n runs ranked at a rung (at least one)."""
    keep = max(1, math.ceil(len(metrics) / eta))
    return ranked(metrics, metric)[:keep]
