"""Every run of a sweep as a DVC experiment, so `dvc exp show`, `dvc plots diff` and `dvc exp apply` treat sweep
runs as any other run.

An experiment is saved with `dvc exp save` from a workspace that holds the run's params (params.yaml with the run's
settings written in, comments kept), its curves (`dvclive/`, with `sweep/chunks` and `sweep/stopped` added to
metrics.json) and nothing else of the run. DVC commits no output for it (`dvc exp save` is limited to the normalize
stage, which a sweep never changes), so the experiment's dvc.lock stays the baseline's: after `dvc exp apply`,
`dvc status` shows the train stage as changed, and `dvc repro` trains the run (resuming from the sweep's checkpoint
while it is there). The workspace's own files are copied aside first and put back afterwards, also after a failure;
a save killed half-way is put back by the next one.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Callable

from ruamel.yaml import YAML

from pipeline.core.errors import PipelineError
from pipeline.publish.sweep_report import lineage_text, settings_text, state_text
from pipeline.run.sweep_state import STOPPED, Run, SweepState
from pipeline.store.artifacts import write_text

BACKUP_NAME = "workspace-backup"  # under the sweep's folder, while an experiment is being saved
UNCHANGED_STAGE = "normalize"  # what `dvc exp save` may commit: a stage no sweep setting reaches


def experiment_name(state: SweepState, run: Run) -> str:
    return f"{state.name}-{run.name}"


def params_text(text: str, overrides: dict) -> str:
    """params.yaml's text with `overrides` (dotted keys) written in, comments and order kept."""
    yaml = YAML()
    yaml.preserve_quotes = True
    tree = yaml.load(text) or {}
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = tree
        for part in path:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[last] = value
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


def marked_metrics(live_dir: Path, run: Run) -> dict:
    """The run's latest DVCLive values with where it stands: `sweep/chunks` trained, `sweep/stopped` (1 or 0)."""
    path = Path(live_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["sweep"] = {"chunks": run.chunks_done, "stopped": int(run.state == STOPPED)}
    return metrics


class Workspace:
    """params.yaml and the DVCLive folder of the workspace, copied aside to `backup` and put back."""

    def __init__(self, params_path: Path, live: Path, backup: Path):
        self.params_path, self.live, self.backup = Path(params_path), Path(live), Path(backup)

    def set_aside(self) -> None:
        self.restore()  # a save killed half-way left the workspace changed: put it back first
        staging = self.backup.with_name(self.backup.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(self.params_path, staging / "params.yaml")
        if self.live.is_dir():
            shutil.copytree(self.live, staging / "live")
        staging.rename(self.backup)

    def restore(self) -> None:
        if not self.backup.is_dir():
            return
        shutil.copy2(self.backup / "params.yaml", self.params_path)
        shutil.rmtree(self.live, ignore_errors=True)
        if (self.backup / "live").is_dir():
            shutil.copytree(self.backup / "live", self.live)
        shutil.rmtree(self.backup)


def save_experiments(
    state: SweepState,
    live_dirs: dict[str, Path],
    params_path: Path,
    live: Path,
    sweep_folder: Path,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Save every run with curves (`live_dirs`: run name → its DVCLive folder) as the experiment
    `<sweep>-<run>`, replacing an earlier save of the same name. Returns the names saved."""
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError:  # pragma: no cover - dvc is a dependency
        raise PipelineError("sweep: saving experiments needs dvc (pip install dvc).") from None
    workspace = Workspace(params_path, live, Path(sweep_folder) / BACKUP_NAME)
    original = Path(params_path).read_text()
    saved = []
    try:
        repo = Repo(".")
    except DvcException as err:
        raise PipelineError(
            f"sweep: not inside a DVC project ({err}); the runs are not saved as experiments (their state and "
            "curves are kept), run `dpo sweep` from the project root, or set sweep.experiments: false."
        ) from None
    try:
        workspace.set_aside()
        for run in state.runs.values():
            source = live_dirs.get(run.name)
            if source is None or not Path(source).is_dir():
                continue
            write_text(Path(params_path), params_text(original, run.overrides))
            shutil.rmtree(live, ignore_errors=True)
            shutil.copytree(source, live)
            write_text(Path(live) / "metrics.json", json.dumps(marked_metrics(source, run), indent=4) + "\n")
            name = experiment_name(state, run)
            message = f"sweep {state.name}: {run.name} {state_text(run)}; {settings_text(run)}"
            if run.start:
                message += f"; {lineage_text(run)}"
            try:
                repo.experiments.save(
                    targets=[UNCHANGED_STAGE], name=name, force=True, include_untracked=[str(live)], message=message
                )
            except DvcException as err:
                raise PipelineError(
                    f"sweep: `dvc exp save` of {name} failed ({err}); the sweep's state and curves are kept under "
                    f"{sweep_folder}; fix the DVC project (`dvc status`) and run `dpo sweep` again, or set "
                    "sweep.experiments: false."
                ) from None
            saved.append(name)
    finally:
        workspace.restore()
        repo.close()
    if saved:
        say(f"sweep: saved {len(saved)} runs as DVC experiments ({', '.join(saved)}): `dvc exp show` lists them")
    return saved
