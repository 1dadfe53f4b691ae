"""The train section checked against `DPOConfig` itself, and the `DPOConfig` of a stage.

Only the stages that build a `DPOConfig` (train, evaluate, export) run this check: values are coerced the way
`HfArgumentParser` reads them (YAML 1.1 reads `3e-5` as a string; it becomes a float), then DPOConfig's own
rules run (`check_dpo_options`, the loss rules included) and a `DPOConfig` is built, all before any model or
data is loaded. Every other stage checks only the section's keys (`pipeline.config.params.check_train_keys`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.integrations import get_available_reporting_integrations

from pipeline.config.dpo_config import DPOConfig, check_dpo_options
from pipeline.config.options import DPO_OPTION_NAMES
from pipeline.config.params import (
    OWNED_ELSEWHERE,
    TRAIN_STAGE_KEYS,
    check_train_keys,
    dpo_default,
    dpo_options,
    load_params,
)
from pipeline.core.errors import PipelineError


@functools.cache
def _dpo_arguments() -> dict[str, Any]:
    """HfArgumentParser's argparse action of every DPOConfig field: its `type` and `choices`."""
    return {action.dest: action for action in HfArgumentParser(DPOConfig)._actions}


def coerce_train_value(key: str, value: Any) -> Any:
    """A train value as HfArgumentParser would read it from the command line: strings go through the field's
    type (so YAML 1.1's string `3e-5` is the float 3e-5); numbers of the wrong kind and unknown choices are refused."""
    action = _dpo_arguments().get(key)
    if action is None or value is None or action.type is None:
        return value
    default = DPOConfig.__dataclass_fields__[key].default
    if value is False and isinstance(default, str):
        return "no"  # YAML 1.1 (and `dvc exp run -S`, which rewrites params.yaml) reads a bare `no` as false
    if action.nargs in ("+", "*") and isinstance(value, list):
        return [coerce_train_value_one(key, action, v) for v in value]
    return coerce_train_value_one(key, action, value)


def coerce_train_value_one(key: str, action, value: Any) -> Any:
    kind = action.type
    if kind in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, str))
            or (kind is int and isinstance(value, float))
        ):
            raise PipelineError(f"params: train.{key} must be {kind.__name__}, got {value!r}.")
        try:
            return kind(value)
        except ValueError:
            raise PipelineError(f"params: train.{key} must be {kind.__name__}, got {value!r}.") from None
    if kind is not str and callable(kind) and isinstance(value, str):  # booleans, enums: argparse's reading
        try:
            value = kind(value)
        except Exception:
            raise PipelineError(
                f"params: train.{key}: {value!r} is not a valid value"
                + (f"; choose from {list(action.choices)}." if action.choices else ".")
            ) from None
    if action.choices and value not in action.choices and str(value) not in map(str, action.choices):
        raise PipelineError(f"params: train.{key} must be one of {list(action.choices)}, got {value!r}.")
    return value


# `report_to` integration → the package that provides it, where the names differ
REPORT_TO_PACKAGES = {
    "azure_ml": "azureml-core",
    "flyte": "flytekit",
    "kubeflow": "kubeflow-training",
    "tensorboard": "tensorboard",
}


def _check_report_to(value) -> None:
    """Every `train.report_to` integration must be installed: transformers would fail in the Trainer with a
    traceback."""
    names = [value] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n not in ("none", "all")]
    if not names:
        return
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in available:
            raise PipelineError(
                f"params: train.report_to names {name!r}, which is not installed: "
                f"`pip install {REPORT_TO_PACKAGES.get(name, name.replace('_', '-'))}`, or remove it "
                f"from train.report_to (the pipeline's own curves go to dvclive/ either way)."
            )


def check_train(params: dict) -> dict:
    """`params` with its train section checked against DPOConfig: keys, types, every DPOConfig rule (the loss
    rules included), and DPOConfig itself; values coerced as HfArgumentParser reads them."""
    train = check_train_keys(params["train"])
    train = {k: (v if k in TRAIN_STAGE_KEYS else coerce_train_value(k, v)) for k, v in train.items()}
    _check_report_to(train.get("report_to"))
    given = {**dpo_options(params), **{k: v for k, v in train.items() if k not in TRAIN_STAGE_KEYS}}
    defaults = {name: dpo_default(name) for name in DPO_OPTION_NAMES}
    try:
        check_dpo_options({**defaults, **given}, name=lambda k: OWNED_ELSEWHERE.get(k, f"train.{k}"))
        DPOConfig(output_dir="unused", **given)
    except PipelineError as err:
        raise PipelineError(f"params: {err}") from None
    except (TypeError, ValueError) as err:  # TrainingArguments' own checks
        raise PipelineError(f"params: train: {err}") from None
    return {**params, "train": train}


def load_train_params(path: str | Path = "params.yaml") -> dict:
    """`load_params` with the train section checked against DPOConfig (`check_train`)."""
    return load_params(path, check_train)


def dpo_config(params: dict, output_dir: Path, **overrides) -> DPOConfig:
    """The DPOConfig of a stage: params.yaml's train section and the DPOConfig options other sections own
    (max_length from tokenize, ...), over the stage's own settings."""
    train = {k: v for k, v in params["train"].items() if k not in TRAIN_STAGE_KEYS}
    settings = {
        "report_to": "none",
        "save_total_limit": 2,
        "seed": params["seed"],
        "data_seed": params["seed"],
        **dpo_options(params),
        **train,
        **overrides,
    }
    try:
        return DPOConfig(output_dir=str(output_dir), **settings)
    except PipelineError:
        raise
    except (TypeError, ValueError) as err:  # TrainingArguments' own checks
        raise PipelineError(f"params: train: {err}") from None
