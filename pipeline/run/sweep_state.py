"""A sweep's state on disk: its runs (one per configuration), where each stands, and the hand requests waiting for it.

`<sweeps>/<name>/state.json` is rewritten (atomically) after every chunk a run trains, so a killed sweep loses at
most the chunk in flight; `dpo sweep stop|resume|clone` write to it directly when no sweep runs, and otherwise leave
a request in `<sweeps>/<name>/requests/` that the running sweep applies at its next chunk boundary. The running
sweep holds `<sweeps>/<name>/lock` (an advisory `flock`), which is how a command tells the two cases apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.store.artifacts import read_json, write_json

LIVE, STOPPED, FINISHED = "live", "stopped", "finished"
STATE_NAME = "state.json"
REQUESTS_NAME = "requests"
LOCK_NAME = "lock"
RUNS_DIR = "runs"


@dataclasses.dataclass
class Run:
    """One configuration of a sweep. `step` is the optimizer step of its last chunk boundary (`chunks_done` chunks
    trained), `fingerprint` names its checkpoint folder, `history` holds the eval metrics of every boundary."""

    name: str
    overrides: dict
    fingerprint: str
    total_steps: int
    state: str = LIVE
    chunks_done: int = 0
    step: int = 0
    stopped: dict | None = None  # {"chunk", "by": "rule" | "hand", "why"}
    parent: str | None = None
    start: dict | None = None  # a clone's: {"parent", "chunk", "step", "mode": clone | fresh-optimizer | warm-start}
    history: list = dataclasses.field(default_factory=list)  # [{"chunk", "step", "metrics": {...}}]

    @property
    def metrics(self) -> dict:
        return self.history[-1]["metrics"] if self.history else {}


@dataclasses.dataclass
class SweepState:
    name: str
    chunks: int
    runs: dict[str, Run] = dataclasses.field(default_factory=dict)
    rungs: list = dataclasses.field(default_factory=list)  # [{"chunk", "ranked": [...], "kept": [...]}]

    def next_name(self) -> str:
        return f"c{len(self.runs) + 1}"

    def run(self, name: str) -> Run:
        if name not in self.runs:
            raise PipelineError(
                f"sweep {self.name}: no run named {name!r}; its runs are {', '.join(self.runs) or 'none yet'} "
                "(`dpo sweep show` lists them)."
            )
        return self.runs[name]

    def live(self) -> list[Run]:
        return [r for r in self.runs.values() if r.state == LIVE]


def sweep_dir(sweeps: Path, name: str) -> Path:
    return Path(sweeps) / name


def load_state(directory: Path) -> SweepState | None:
    path = Path(directory) / STATE_NAME
    if not path.exists():
        return None
    raw = read_json(path, "the sweep's state", f"remove {directory} to start the sweep afresh")
    try:
        runs = {name: Run(**run) for name, run in raw["runs"].items()}
        return SweepState(raw["name"], raw["chunks"], runs, raw.get("rungs", []))
    except (KeyError, TypeError) as err:
        raise PipelineError(
            f"{path}: the sweep's state is not one this version writes ({type(err).__name__}: {err}); remove "
            f"{directory} to start the sweep afresh."
        ) from None


def save_state(directory: Path, state: SweepState) -> None:
    write_json(
        Path(directory) / STATE_NAME,
        {
            "name": state.name,
            "chunks": state.chunks,
            "runs": {n: dataclasses.asdict(r) for n, r in state.runs.items()},
            "rungs": state.rungs,
        },
    )


@contextlib.contextmanager
def holding_lock(directory: Path, blocking: bool = True):
    """Hold the sweep's lock for the body: yields True when held, False when another process holds it (only with
    blocking=False)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_request(directory: Path, request: dict) -> Path:
    """Leave a request for the running sweep (written whole, then renamed into place)."""
    folder = Path(directory) / REQUESTS_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time_ns()}-{os.getpid()}.json"
    write_json(path, request)
    return path


def take_requests(directory: Path) -> list[dict]:
    """The waiting requests, oldest first, removed as they are read."""
    folder = Path(directory) / REQUESTS_NAME
    requests = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            requests.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a request half-written by a killed command: never applied
        finally:
            path.unlink(missing_ok=True)
    return requests
