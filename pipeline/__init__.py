"""A staged, cached DPO training pipeline. In-process API: `from pipeline import DPOConfig, DPOTrainer`; the judges of
evaluate: `from pipeline import RewardModelJudge, PairwiseJudge, BuiltinJudge, compare_answers`.

The names below are imported on first use, so a stage that needs only `pipeline.store.artifacts` does not
execute the trainer: `dvc.yaml` can then list exactly the files each stage runs.
"""

import importlib

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "PipelineError",
    "BuiltinJudge",
    "RewardModelJudge",
    "PairwiseJudge",
    "compare_answers",
]
__version__ = "0.1.0"

_HOMES = {
    "DPOConfig": ".config.dpo_config",
    "DPOTrainer": ".run.trainer",
    "PipelineError": ".core.errors",
    "BuiltinJudge": ".judge.judges",
    "RewardModelJudge": ".judge.judges",
    "PairwiseJudge": ".judge.judges",
    "compare_answers": ".judge.results",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
