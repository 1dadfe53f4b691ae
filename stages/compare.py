"""dpo compare: the baseline and its experiments side by side, and (--html) their curves on one offline page.

Not a pipeline stage (dvc.yaml never runs it): it reads what `dvc exp show --json` reports of each run (params,
results/eval.json with its environment record) and each run's DVCLive curves as git holds them at its commit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import click

from pipeline.publish.comparison import Run, comparison_text, dedupe_workspace, flat_params, render_comparison
from pipeline.publish.metrics_file import ENVIRONMENT, flatten
from pipeline.publish.report import read_curves
from pipeline.store.artifacts import write_text

from . import paths


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(command[:4])} failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


def exp_show(all_commits: bool = False) -> list[dict]:
    """`dvc exp show --json`: one row per commit (and the workspace), each with its experiments."""
    import json

    out = _run([sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])])
    return json.loads(out.strip().splitlines()[-1])


def to_run(row: dict, name: str, params_file: str, metrics_file: str) -> Run | None:
    """A `dvc exp show --json` row as a Run; None for a run without results (queued, failed)."""
    data = row.get("data") or {}
    if row.get("error") or not data:
        return None
    params = ((data.get("params") or {}).get(params_file) or {}).get("data") or {}
    metrics = dict(((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {})
    environment = metrics.pop(ENVIRONMENT, None) or {}
    rev = row["rev"]
    return Run(name=name, rev=rev, params=flat_params(params), metrics=flatten(metrics), environment=environment)


def runs_of(rows: list[dict], params_file: str, metrics_file: str, wanted: tuple[str, ...] = ()) -> list[Run]:
    """The runs of `dvc exp show --json` rows: each commit, then its experiments; with `wanted` (names or revs),
    the commits and the experiments named."""
    runs = []
    for row in rows:
        commit = to_run(
            row,
            "workspace" if row["rev"] == "workspace" else row.get("name") or row["rev"][:7],
            params_file,
            metrics_file,
        )
        if commit and (not wanted or row["rev"] != "workspace" or "workspace" in wanted):
            runs.append(commit)
        for experiment in row.get("experiments") or []:
            head = (experiment.get("revs") or [{}])[0]
            name = head.get("name") or experiment.get("name") or str(head.get("rev", ""))[:7]
            run = to_run(head, name, params_file, metrics_file) if head else None
            if run and (not wanted or any(w == name or head["rev"].startswith(w) for w in wanted)):
                runs.append(run)
    return dedupe_workspace(runs)


def curves_at(rev: str, live: Path) -> dict:
    """The DVCLive curves under `live` as git holds them at `rev` (the workspace: as they are on disk)."""
    if rev == "workspace":
        return read_curves(live)
    listing = _run(["git", "ls-tree", "-r", "--name-only", rev, "--", f"{Path(live).as_posix()}/plots/metrics"])
    with tempfile.TemporaryDirectory(prefix="dpo-compare-") as tmp:
        for path in listing.split():
            target = Path(tmp) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            # ls-tree names paths from the current folder (vision/ in the vision project); `rev:./path` reads them so
            shown = subprocess.run(["git", "show", f"{rev}:./{path}"], capture_output=True, check=True)
            target.write_bytes(shown.stdout)
        return read_curves(Path(tmp) / live)


@click.command("compare")
@click.argument("experiments", nargs=-1)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every run's curves (dvclive/) to this self-contained HTML page (opens offline).",
)
@click.option("-A", "--all-commits", is_flag=True, help="Every commit's runs, not only HEAD's (dvc exp show -A).")
@click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    help="The params file the runs read, in the DVC project run from (inside vision/ for the vision default).",
)
@click.option("--metrics", default=str(paths.METRICS), show_default=True, help="The eval metrics file of the runs.")
@click.option(
    "--live",
    default=str(paths.LIVE),
    show_default=True,
    type=click.Path(path_type=Path),
    help="The runs' DVCLive directory (the curves).",
)
def command(
    experiments: tuple[str, ...], html_path: Path | None, all_commits: bool, params_path: str, metrics: str, live: Path
) -> None:
    """Compare the baseline commit with its experiments (or only the EXPERIMENTS named): the params that differ,
    held-out rewards/accuracies and rewards/margins, the judged win rate, and the machine each run was made on
    (with a warning when they differ). Run it in the project's root."""
    runs = runs_of(exp_show(all_commits), Path(params_path).as_posix(), Path(metrics).as_posix(), experiments)
    if not runs:
        raise click.ClickException("no runs with results: run `dvc repro` (the baseline) or `dvc exp run` first")
    click.echo(comparison_text(runs), nl=False)
    if html_path is not None:
        for run in runs:
            run.curves = curves_at(run.rev, live)
        write_text(html_path, render_comparison(runs))
        click.echo(f"curves: {html_path}")
