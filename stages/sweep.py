"""dpo sweep: params.yaml's `sweep` configurations trained side by side in chunks over the cached base, tokenize and
ref-logps artifacts, the losers stopped at each rung; `dpo sweep stop|resume|clone|show` act on a sweep, running or
not. Not a pipeline stage (dvc.yaml never runs it): every run is saved as a DVC experiment when the sweep ends.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from pipeline.config.train_params import check_train
from pipeline.core.errors import PipelineError
from pipeline.publish.experiments import save_experiments
from pipeline.publish.report import read_curves
from pipeline.publish.sweep_report import progress_text, render_sweep
from pipeline.run.sweep import CLONE, FRESH_OPTIMIZER, WARM_START, Sweep, SweepPaths, apply_request
from pipeline.run.sweep_plan import check_key
from pipeline.run.sweep_state import RUNS_DIR, SweepState, add_request, holding_lock, load_state, save_state
from pipeline.store.artifacts import write_text

from . import paths
from .common import load, params_option, path_option, user_errors

REPORT_NAME = "report.html"


def sweep_paths(tokenized, ref_logps, base, normalized, checkpoints, sweeps) -> SweepPaths:
    return SweepPaths(*(Path(p) for p in (tokenized, ref_logps, base, normalized, checkpoints, sweeps)))


def write_report(sweep: Sweep, state: SweepState) -> Path:
    """The sweep's page, rewritten (atomically) at every boundary: `<sweeps>/<name>/report.html`."""
    curves = {name: read_curves(sweep.dir / RUNS_DIR / name / "dvclive") for name in state.runs}
    path = sweep.dir / REPORT_NAME
    write_text(path, render_sweep(state, curves, sweep.cfg["metric"]))
    return path


def run(
    params: dict, sweep_paths: SweepPaths, params_path: Path, live: Path = paths.LIVE, say=click.echo
) -> SweepState:
    """Plan the sweep (everything refused before anything trains), train it to the end, save the experiments."""
    sweep = Sweep(params, sweep_paths, say=say)

    def boundary(state: SweepState) -> None:
        write_report(sweep, state)
        say(progress_text(state, sweep.cfg["metric"]))

    sweep.on_boundary = boundary
    with holding_lock(sweep.dir, blocking=False) as held:
        if not held:
            raise PipelineError(
                f"sweep {sweep.cfg['name']} is already running (another process holds {sweep.dir / 'lock'}); "
                "act on it with `dpo sweep stop|resume|clone`, or wait for it to end."
            )
        save_state(sweep.dir, sweep.state)
        state = sweep.run()
        report = write_report(sweep, state)
        say(progress_text(state, sweep.cfg["metric"]))
        say(f"sweep: report: {report}")
        if sweep.cfg["experiments"]:
            live_dirs = {name: sweep.live_dir(r) for name, r in state.runs.items()}
            save_experiments(state, live_dirs, params_path, live, sweep.dir, say=say)
    return state


def request(params: dict, sweep_paths: SweepPaths, action: dict, say=click.echo) -> None:
    """Carry out a hand request now when no sweep runs, else leave it for the running sweep's next boundary."""
    directory = sweep_paths.sweeps / params["sweep"]["name"]
    if load_state(directory) is None:
        raise PipelineError(
            f"sweep {params['sweep']['name']}: nothing to act on yet ({directory} holds no sweep); start it with "
            "`dpo sweep`."
        )
    with holding_lock(directory, blocking=False) as held:
        if not held:
            add_request(directory, action)
            say(f"sweep: the running sweep applies `{action['action']} {action['run']}` at its next chunk boundary")
            return
        sweep = Sweep(params, sweep_paths, say=say)
        say(f"sweep: {apply_request(sweep, action)}")
        save_state(sweep.dir, sweep.state)
        write_report(sweep, sweep.state)
        say(progress_text(sweep.state, sweep.cfg["metric"]))


def parse_settings(settings: tuple[str, ...]) -> dict:
    """`-S train.learning_rate=1e-4` values as YAML reads them (as `dvc exp run -S` does)."""
    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"sweep clone: -S {item!r}: write -S key=value, e.g. -S train.learning_rate=1e-4.")
        check_key(key.strip(), "sweep clone -S")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@click.group("sweep", invoke_without_command=True)
@params_option
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact.")
@path_option("ref-logps", paths.REF_LOGPS, "The reference log-probs.")
@path_option("base", paths.BASE, "The base artifact: the starting policy.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact (held-out prompts for sweep.metric: win_rate).")
@path_option("checkpoints", paths.CHECKPOINTS, "Checkpoints, one folder per run fingerprint (the train stage's).")
@path_option("sweeps", paths.ARTIFACTS / "sweeps", "Each sweep's state, curves and report: <sweeps>/<sweep.name>/.")
@path_option("live", paths.LIVE, "The workspace's DVCLive folder (each run's curves go there in its experiment).")
@click.pass_context
@user_errors
def command(ctx, params_path, tokenized, ref_logps, base, normalized, checkpoints, sweeps, live) -> None:
    """Train params.yaml's sweep configurations side by side in chunks, stopping the losers (successive halving).

    Run it again after an interruption: every live run continues where it stopped. See docs/caching.md (Sweeps)."""
    ctx.obj = {
        "params_path": params_path,
        "paths": sweep_paths(tokenized, ref_logps, base, normalized, checkpoints, sweeps),
    }
    if ctx.invoked_subcommand is None:
        params = load(params_path, check_train)
        run(params, ctx.obj["paths"], params_path, live)


def _params(ctx) -> dict:
    return load(ctx.obj["params_path"], check_train)


@command.command("stop")
@click.argument("run_name")
@click.pass_context
@user_errors
def stop(ctx, run_name: str) -> None:
    """Stop a run at its latest chunk boundary (kept, resumable)."""
    request(_params(ctx), ctx.obj["paths"], {"action": "stop", "run": run_name})


@command.command("resume")
@click.argument("run_name")
@click.pass_context
@user_errors
def resume(ctx, run_name: str) -> None:
    """Make a stopped run live again; the next `dpo sweep` (or the running one) trains it on."""
    request(_params(ctx), ctx.obj["paths"], {"action": "resume", "run": run_name})


@command.command("clone")
@click.argument("run_name")
@click.option(
    "-S", "--set", "settings", multiple=True, help="key=value over the parent's settings, e.g. -S train.beta=0.2."
)
@click.option("--fresh-optimizer", is_flag=True, help="Start the clone's optimizer afresh (no moments).")
@click.option("--warm-start", is_flag=True, help="A fresh run (step 0, fresh optimizer) from the parent's weights.")
@click.pass_context
@user_errors
def clone(ctx, run_name: str, settings: tuple[str, ...], fresh_optimizer: bool, warm_start: bool) -> None:
    """A new run from RUN_NAME's latest chunk boundary with new settings (its weights and optimizer state)."""
    if fresh_optimizer and warm_start:
        raise PipelineError("sweep clone: --warm-start already starts a fresh optimizer; give one of the two.")
    mode = WARM_START if warm_start else FRESH_OPTIMIZER if fresh_optimizer else CLONE
    overrides = parse_settings(settings)
    if not overrides:
        raise PipelineError("sweep clone: give the new settings with -S key=value (e.g. -S train.learning_rate=1e-4).")
    request(_params(ctx), ctx.obj["paths"], {"action": "clone", "run": run_name, "overrides": overrides, "mode": mode})


@command.command("show")
@click.pass_context
@user_errors
def show(ctx) -> None:
    """The sweep's runs, one line each: state, chunks, eval metrics, settings, lineage."""
    params = load(ctx.obj["params_path"])
    state = load_state(ctx.obj["paths"].sweeps / params["sweep"]["name"])
    if state is None:
        raise PipelineError(f"sweep {params['sweep']['name']}: not started; start it with `dpo sweep`.")
    click.echo(progress_text(state, params["sweep"]["metric"]))
