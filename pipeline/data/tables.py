"""Reading artifact tables back: tokenized pairs joined to reference log-probs by `row_id`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import PipelineError
from pipeline.store.artifacts import manifest_digest, read_manifest, require_same_input


def read_tokenized(tokenized_dir: Path, split: str) -> pa.Table:
    read_manifest(tokenized_dir, "tokenized")
    return pq.read_table(Path(tokenized_dir) / f"{split}.parquet")


def check_ref_logps(ref_dir: Path, tokenized_dir: Path) -> dict:
    """The ref-logps manifest, refused if it was computed for other tokenized data."""
    manifest = read_manifest(ref_dir, "ref_logps")
    require_same_input(manifest, ref_dir, "tokenized", manifest_digest(tokenized_dir), "ref_logps")
    return manifest


def join_ref_logps(pairs: pa.Table, ref_dir: Path, split: str) -> pa.Table:
    """Attach reference columns to `pairs` by row_id; every pair must have its reference row."""
    ref = pq.read_table(Path(ref_dir) / f"{split}.parquet")
    missing = set(pairs.column("row_id").to_pylist()) - set(ref.column("row_id").to_pylist())
    if missing:
        raise PipelineError(
            f"{ref_dir}/{split}.parquet lacks reference log-probs for {len(missing)} row(s) "
            f"(e.g. {sorted(missing)[0]}); re-run `dpo ref-logps`."
        )
    position = {row_id: i for i, row_id in enumerate(ref.column("row_id").to_pylist())}
    aligned = ref.take([position[row_id] for row_id in pairs.column("row_id").to_pylist()])
    for name in ref.column_names:
        if name != "row_id":
            pairs = pairs.append_column(name, aligned.column(name))
    return pairs


def load_pairs(tokenized_dir: Path, split: str, ref_dir: Path | None = None):
    """A `datasets.Dataset` of tokenized pairs, with reference columns when `ref_dir` is given."""
    import datasets

    table = read_tokenized(tokenized_dir, split)
    if ref_dir is not None:
        check_ref_logps(ref_dir, tokenized_dir)
        table = join_ref_logps(table, ref_dir, split)
    return datasets.Dataset(table)
