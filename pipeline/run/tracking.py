"""Training curves as files DVC shows (`dvc metrics show`, `dvc plots show`), through DVCLive.

Every Trainer log becomes one DVCLive point at the Trainer's `global_step`: `train/<key>` for a training log,
`eval/<key>` for an `eval_<key>` one, so both sides of a metric share a name (`train/rewards/accuracies`,
`eval/rewards/accuracies`). `metrics.json` holds the latest values, `plots/metrics/{train,eval}/…tsv` the
history. Timings vary from run to run and are left out, so the files are the same bytes for the same run.

The directory is rebuilt from the Trainer's `state.log_history` when training begins (on a resumed run that is
the checkpoint's history), so points logged after the checkpoint by an interrupted run are not kept twice, and a
run killed and resumed writes the same files as one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

# Trainer log keys that measure the machine, not the run (train_runtime, eval_samples_per_second, and the
# memory tracker's *_mem_* figures): they go to stdout, never to files
TIMING_SUFFIXES = ("_runtime", "_per_second")
MEMORY_MARK = "_mem_"
# keys of the Trainer's end-of-training log: one value for the whole run, a summary rather than a curve point
RUN_SUMMARY_KEYS = ("train_loss", "total_flos")
# a Trainer log's bookkeeping that duplicates the point's step
STEP_KEYS = ("step", "global_step")


def is_timing(key: str) -> bool:
    return key.endswith(TIMING_SUFFIXES) or MEMORY_MARK in key


def without_timings(logs: dict) -> dict:
    """A log (or metrics) dict without its run-to-run timings."""
    return {k: v for k, v in logs.items() if not is_timing(k)}


def timings(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if is_timing(k)}


def whole_run_train_loss(history: list[dict]) -> float | None:
    """The mean training loss over the steps the logged losses cover (each log's loss is the mean since the
    previous one). The Trainer's own `train_loss` covers only the steps of its last `train()` call, so it
    would differ after a resume; this one is the same for a resumed run and an uninterrupted one."""
    total, last = 0.0, 0
    for entry in history:
        if "loss" in entry and entry.get("step", 0) > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else None


def run_log(logs: dict, history: list[dict]) -> dict:
    """A Trainer log as the run's files keep it: timings dropped, and the end-of-training `train_loss` made
    the whole run's (`whole_run_train_loss` of the log history)."""
    logs = without_timings(logs)
    if "train_loss" in logs and whole_run_train_loss(history) is not None:
        logs["train_loss"] = whole_run_train_loss(history)
    return logs


def live_points(logs: dict) -> dict[str, float]:
    """DVCLive names and values of one Trainer log: an evaluation's `eval_<key>` (and its `epoch`) → eval/<key>,
    a training log's <key> → train/<key>; timings, the step bookkeeping and non-numeric values dropped."""
    mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
    points = {}
    for key, value in logs.items():
        if is_timing(key) or key in STEP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        points[f"{mode}/{key.removeprefix('eval_') if mode == 'eval' else key}"] = value
    return dict(sorted(points.items()))  # a resumed checkpoint's history has its keys sorted: the same order


def is_run_summary(logs: dict) -> bool:
    return any(key in logs for key in RUN_SUMMARY_KEYS)


class LiveMetricsCallback(TrainerCallback):
    """Drives a `dvclive.Live` in `directory` (process zero only): one point per Trainer log at `global_step`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.live = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # the history the Trainer holds now: a resumed checkpoint's (loaded before this call), empty for a fresh run
        self.live = rebuilt_live(self.directory, state.log_history)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and logs:
            log_point(self.live, state.global_step, run_log(logs, state.log_history))

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
            self.live = None


def rebuilt_live(directory: Path, history: list[dict]):
    """A `dvclive.Live` in `directory` whose files hold exactly `history` (a Trainer's log history): DVCLive clears
    its metrics and plots (resume=False), then every entry is logged with the calls `on_log` makes, so the files are
    the same bytes as those of a run that logged them one by one."""
    from dvclive import Live

    live = Live(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=False, report=None)
    for entry in history:
        log_point(live, entry["step"], entry)
    return live


def log_point(live, step: int, logs: dict) -> None:
    """One Trainer log as DVCLive points at `step` (`live_points`); metrics.json then holds the latest values."""
    live.step = step  # before the values: each lands at the step it describes
    plot = not is_run_summary(logs)  # the end-of-training log only updates metrics.json
    for name, value in live_points(logs).items():
        live.log_metric(name, value, timestamp=False, plot=plot)
    live.sync()
