"""dpo judge-pairs: every generated answer scored by the judge (judge_pairs.*), paired (best vs worst per prompt, or
every pair past min_margin) into a normalized artifact that `dpo tokenize` reads; report.json says how many prompts
came in, how many gave a pair, which were dropped and why, and how the scores are spread."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.core.distributed import is_main
from pipeline.run.pair_building import build_pairs
from pipeline.store.artifacts import stage_output, write_json

from . import paths
from .common import launches, load, params_option, path_option, round_option, user_errors


def run(params: dict, samples: Path = paths.SAMPLES, normalized: Path = paths.NORMALIZED, out: Path = paths.PAIRS):
    """Score and pair the answers of `samples` into `out`; `normalized` gives the eval split and the original pairs
    (recorded aside: `out` is a normalized artifact too). Returns the report."""
    round_cfg = params.get("round") or {}
    used = {
        "judge_pairs": params["judge_pairs"],
        "judge_model": params["evaluate"]["judge_model"],
        "pairs": round_cfg.get("pairs", "generated"),
        "original_pairs": round_cfg.get("original_pairs"),
    }
    aside = {"original": ("normalized", normalized)}
    with stage_output("judge-pairs", out, {"samples": samples}, used, aside=aside) as output:
        report = build_pairs(params, samples, normalized, output.dir)
        if is_main():
            write_json(output.dir / "report.json", report)
        output.rows = report["rows"]
        output.extra["report"] = {k: v for k, v in report.items() if k != "rows"}
    return report


@click.command("judge-pairs")
@params_option
@path_option("samples", paths.SAMPLES, "The answers of `dpo generate`.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact: its eval split (and original train pairs).")
@path_option("out", paths.PAIRS, "Where to write the pairs (a normalized artifact).")
@round_option
@user_errors
@launches
def command(params_path: Path, samples: Path, normalized: Path, out: Path, round_name: str | None) -> None:
    """Score every answer with the judge and pair them (judge_pairs.* params) in the normalized schema."""
    report = run(load(params_path, round_name=round_name), samples, normalized, out)
    click.echo(json.dumps({k: v for k, v in report.items() if k != "judge_source"}, indent=1))
