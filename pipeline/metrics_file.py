"""The eval metrics file DVC reads (`results/eval.json`): "/"-separated names nested as DVCLive nests them.

Training logs `train/rewards/accuracies` into `dvclive/metrics.json` as {"train": {"rewards": {"accuracies": …}}};
evaluate writes {"rewards": {"accuracies": …}}, so `dvc metrics show` and `dvc exp show` name the same
metric the same way in both files. In code, metrics stay flat (`rewards/accuracies`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import write_json


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


def write_metrics(path: Path, flat: dict) -> None:
    write_json(Path(path), nest(flat))


def read_metrics(path: Path) -> dict:
    """The flat metrics of a metrics file; {} when there is none."""
    return flatten(json.loads(Path(path).read_text())) if Path(path).exists() else {}
