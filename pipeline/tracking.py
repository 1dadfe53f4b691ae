"""Training metrics as files DVC shows (`dvc metrics show`, `dvc plots show`), through DVCLive.

transformers' own `DVCLiveCallback` does the logging; ours only puts each point at the Trainer's
global step (the stock callback counts log calls, so a point's step is not the step it describes).
"""

from __future__ import annotations

from pathlib import Path

from transformers.integrations import DVCLiveCallback


class LiveMetricsCallback(DVCLiveCallback):
    """Every Trainer log becomes one DVCLive point at `global_step`: metrics.json holds the latest, plots/ the history."""

    def __init__(self, directory: Path):
        from dvclive import Live

        super().__init__(live=Live(dir=str(directory), save_dvc_exp=False, dvcyaml=False), log_model=False)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if state.is_world_process_zero and self.live is not None:
            self.live.step = state.global_step
        super().on_log(args, state, control, model=model, logs=logs, **kwargs)
