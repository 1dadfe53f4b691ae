"""dpo tokenize: canonical pairs → token ids (with truncation) in artifacts/tokenized."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.data.tokenize import tokenize_dataset
from pipeline.model.loading import load_base_tokenizer
from pipeline.store.artifacts import stage_output

from . import paths
from .common import load, params_option, path_option, user_errors


def run(
    params: dict, normalized: Path = paths.NORMALIZED, base: Path = paths.BASE, out: Path = paths.TOKENIZED
) -> dict:
    used = {**params["tokenize"], "on_invalid": params["data"]["on_invalid"]}
    with stage_output("tokenize", out, {"normalized": normalized, "base": base}, used) as output:
        report = tokenize_dataset(load_base_tokenizer(base, params), normalized, output.dir, params)
        output.rows = {split: r["rows_written"] for split, r in report.items()}
    return report


@click.command("tokenize")
@params_option
@path_option("normalized", paths.NORMALIZED, "The normalized artifact.")
@path_option("base", paths.BASE, "The base artifact (its tokenizer is used).")
@path_option("out", paths.TOKENIZED, "Where to write the tokenized splits.")
@user_errors
def command(params_path: Path, normalized: Path, base: Path, out: Path) -> None:
    """Tokenize the normalized pairs with the base model's tokenizer (tokenize.* params)."""
    report = run(load(params_path), normalized, base, out)
    for split, r in report.items():
        click.echo(
            f"tokenize {split}: read {r['rows_read']}, wrote {r['rows_written']}, dropped {r['rows_dropped']} "
            f"{r['dropped_by_reason'] or ''}; truncated {r['rows_truncated']} rows "
            f"({r['completions_truncated']} completions cut, {r['completions_emptied']} emptied); "
            f"{r['boundary_merges']} prompt-boundary merges"
            + (f"; {r['unknown_tokens']['rate']:.2%} unknown tokens" if r.get("unknown_tokens") else "")
        )
