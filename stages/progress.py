"""dpo progress: every round's eval figures (results/round/<name>/eval.json) in one table across the rounds of
iterate.rounds: results/progress.json (DVC metrics), results/progress.tsv (`dvc plots`, against the round) and
results/progress.html."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.core.errors import PipelineError
from pipeline.publish.metrics_file import read_metrics
from pipeline.publish.progress import progress_metrics, progress_tsv, render_progress, round_row
from pipeline.store.artifacts import write_json, write_text

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, rounds_results: Path, out: Path) -> list[dict]:
    rows = []
    for number, name in enumerate(params["iterate"]["rounds"], start=1):
        path = Path(rounds_results) / name / "eval.json"
        if not path.exists():
            raise PipelineError(f"{path}: round {name} has no eval metrics; run its evaluate stage first.")
        rows.append(round_row(number, name, read_metrics(path), params["iterate"]["reference"]))
    if not rows:
        raise PipelineError("iterate.rounds is empty: there is no round to show; add rounds (docs/rounds.md).")
    write_json(Path(out) / "progress.json", progress_metrics(rows))
    write_text(Path(out) / "progress.tsv", progress_tsv(rows))
    write_text(Path(out) / "progress.html", render_progress(rows))
    return rows


@click.command("progress")
@params_option
@path_option("rounds-results", paths.RESULTS / "round", "Each round's results folder, by round name.")
@path_option("out", paths.RESULTS, "Where to write progress.json, progress.tsv and progress.html.")
@user_errors
def command(params_path: Path, rounds_results: Path, out: Path) -> None:
    """Gather every round's judged win rates (over the initial model and over the round before, with their intervals)
    and reward accuracy into one table, a plot against the round, and a page."""
    for row in run(load(params_path), rounds_results, out):
        click.echo(
            f"round {row['name']}: win rate over initial {row['win_rate_initial']}, over previous "
            f"{row['win_rate_previous']}, reward accuracy {row['reward_accuracy']}"
        )
