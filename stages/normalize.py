"""dpo normalize: raw preference data → canonical Parquet splits in artifacts/normalized."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.data.normalize import normalize_dataset
from pipeline.store.artifacts import stage_output

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, out: Path = paths.NORMALIZED) -> dict:
    with stage_output("normalize", out, {}, {"seed": params["seed"], "data": params["data"]}) as output:
        report = normalize_dataset(params, output.dir)
        output.rows, output.extra["sources"] = report["rows_written"], report["sources"]
        hook = report["sources"]["preprocess"]
        if hook and hook["sha256"]:  # editing the hook changes the artifact's identity
            output.inputs["preprocess"] = hook["sha256"]
    return report


@click.command("normalize")
@params_option
@path_option("out", paths.NORMALIZED, "Where to write the normalized splits.")
@user_errors
def command(params_path: Path, out: Path) -> None:
    """Validate and normalize the preference data (data.* params) to the canonical schema."""
    report = run(load(params_path), out)
    click.echo(
        f"normalize: read {report['rows_read']}, wrote {report['rows_written']}, dropped {report['rows_dropped']} "
        f"{report['dropped_by_reason'] or ''} -> {out}"
    )
