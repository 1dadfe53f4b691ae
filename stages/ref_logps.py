"""dpo ref-logps: reference log-probs of every tokenized pair, by row_id, in artifacts/ref_logps.

The reference is the one online training would use: model.ref_name_or_path if set; else the initial
policy: the base model carrying the starting adapter when one is continued (model.adapter), else the
base model (which is also a new adapter's reference: the policy with its adapter disabled).
"""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.artifacts import manifest_digest, staged_dir, write_manifest
from pipeline.base import adapter_source, load_base_tokenizer, load_reference, reference_source
from pipeline.collator import DataCollatorForPreference
from pipeline.data.schema import REF_LOGPS_SCHEMA, SPLITS
from pipeline.data.tables import read_tokenized
from pipeline.reference import reference_logps

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, tokenized: Path = paths.TOKENIZED, base: Path = paths.BASE, out: Path = paths.REF_LOGPS) -> dict:
    tables = {split: read_tokenized(tokenized, split) for split in SPLITS}
    tokenizer = load_base_tokenizer(base, params)
    model = load_reference(base, params)
    kind = "explicit" if reference_source(base) else "starting adapter" if adapter_source(base) else "base"
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    collator = DataCollatorForPreference(tokenizer.pad_token_id)
    batch_size = params["ref_logps"]["precompute_ref_batch_size"]
    with staged_dir(out) as tmp:
        for split, table in tables.items():
            computed = reference_logps(model, table.to_pylist(), collator, batch_size, progress=True)
            pq.write_table(pa.Table.from_pydict(computed, schema=REF_LOGPS_SCHEMA), tmp / f"{split}.parquet")
        inputs = {"tokenized": manifest_digest(tokenized), "base": manifest_digest(base)}
        return write_manifest(tmp, "ref-logps", inputs=inputs, params=params["ref_logps"],
                              rows={split: t.num_rows for split, t in tables.items()}, extra={"reference": kind})


@click.command("ref-logps")
@params_option
@path_option("tokenized", paths.TOKENIZED, "The tokenized artifact.")
@path_option("base", paths.BASE, "The base artifact: names the reference model (and the adapter it carries).")
@path_option("out", paths.REF_LOGPS, "Where to write the reference log-probs.")
@user_errors
def command(params_path: Path, tokenized: Path, base: Path, out: Path) -> None:
    """Precompute the reference model's completion log-probs for every pair (ref_logps.* params)."""
    manifest = run(load(params_path), tokenized, base, out)
    click.echo(f"ref-logps: {manifest['rows']} -> {out}")
