"""dpo ref-logps: reference log-probs of every tokenized pair, by row_id, in artifacts/ref_logps.

The reference is the one online training would use (`pipeline.objective.reference.resolve_reference`):
model.ref_name_or_path if set; else the initial policy: the base model, carrying the starting adapter
when one is continued (model.adapter); a new adapter's reference is the base itself.

The pass streams (`pipeline.run.reference_pass.write_reference_logps`): blocks of pairs are read, scored and written as
Parquet row groups one after another, so memory stays flat in the number of pairs.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config.params import train_option
from pipeline.model.loading import load_base_tokenizer, load_policy
from pipeline.objective.reference import stage_reference
from pipeline.run.reference_pass import write_reference_logps
from pipeline.store.artifacts import stage_output

from . import paths
from .common import launches, load, params_option, path_option, user_errors


def run(params: dict, tokenized: Path = paths.TOKENIZED, base: Path = paths.BASE, out: Path = paths.REF_LOGPS) -> dict:
    layout = {name: train_option(params, name) for name in ("prefix_sharing", "packing")}
    with stage_output(
        "ref-logps", out, {"tokenized": tokenized, "base": base}, {**params["ref_logps"], **layout}
    ) as output:
        reference = stage_reference(base, params, load_policy(base, params, trainable=False), "before_training")
        batch_size = params["ref_logps"]["precompute_ref_batch_size"] or train_option(
            params, "per_device_eval_batch_size"
        )
        per_rank: dict = {}
        output.rows = write_reference_logps(
            reference,
            tokenized,
            load_base_tokenizer(base, params),
            batch_size,
            output.dir,
            **layout,
            rows_per_rank=per_rank,
        )
        output.extra = {"reference": reference.description, "rows_per_rank": per_rank}
    return output.manifest


@click.command("ref-logps")
@params_option
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact.")
@path_option("base", paths.BASE, "The base artifact: names the reference model (and the adapter it carries).")
@path_option("out", paths.REF_LOGPS, "Where to write the reference log-probs.")
@user_errors
@launches
def command(params_path: Path, tokenized: Path, base: Path, out: Path) -> None:
    """Precompute the reference model's completion log-probs for every pair (ref_logps.* params)."""
    manifest = run(load(params_path), tokenized, base, out)
    click.echo(f"ref-logps: {manifest['rows']} -> {out}")
