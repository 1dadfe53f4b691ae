"""The eval metrics file DVC reads (`results/eval.json`): "/"-separated names nested as DVCLive nests them.

Training logs `train/rewards/accuracies` into `dvclive/metrics.json` as {"train": {"rewards": {"accuracies": …}}};
evaluate writes {"rewards": {"accuracies": …}}, so `dvc metrics show` and `dvc exp show` name the same
metric the same way in both files. In code, metrics stay flat (`rewards/accuracies`). Beside the metrics, the file
records where the run ran under `environment` (`pipeline.core.environment`): `dvc metrics diff` then names a machine
change next to the numbers it moved.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.store.artifacts import read_json, write_json

ENVIRONMENT = "environment"  # the record of where the run ran: beside the metrics, not one of them


def nest(flat: dict) -> dict:
    nested: dict = {}
    for name, value in sorted(flat.items()):
        node = nested
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def flatten(nested: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def write_metrics(path: Path, flat: dict, environment: dict | None = None) -> None:
    """Write the metrics, nested, with the `environment` record beside them when one is given."""
    write_json(Path(path), {**nest(flat), **({ENVIRONMENT: environment} if environment is not None else {})})


def _read(path: Path) -> dict:
    if not Path(path).exists():
        return {}
    data = read_json(
        path,
        "this metrics file",
        "run `dvc repro evaluate` (or `dpo evaluate`) to write it again, or `git checkout` it",
    )
    if not isinstance(data, dict):
        raise PipelineError(
            f"{path}: this metrics file is damaged: it holds a JSON {type(data).__name__}, not an "
            "object; run `dvc repro evaluate` (or `dpo evaluate`) to write it again, or `git checkout` it."
        )
    return data


def read_metrics(path: Path) -> dict:
    """The flat metrics of a metrics file (its environment record left out); {} when there is none."""
    return flatten({k: v for k, v in _read(path).items() if k != ENVIRONMENT})


def read_environment(path: Path) -> dict:
    """The environment record of a metrics file; {} when there is none."""
    return _read(path).get(ENVIRONMENT) or {}
