"""Training metrics as files DVC shows (`dvc metrics show`, `dvc plots show`), through DVCLive."""

from __future__ import annotations

import numbers
from pathlib import Path

from transformers import TrainerCallback


class LiveMetricsCallback(TrainerCallback):
    """Every Trainer log becomes one DVCLive step: metrics.json holds the latest, plots/ the history."""

    def __init__(self, directory: Path):
        from dvclive import Live

        self.live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        for name, value in logs.items():
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                self.live.log_metric(name, float(value))
        self.live.step = state.global_step
        self.live.next_step()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.live.end()
