"""A stage checks what it reads: every file of its input artifacts has the digest its manifest
recorded, and the whole chain back to the source data is the one they were made from. A tampered
or stale input is refused, naming it and the stage to re-run."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

import stages.normalize as normalize_stage
import stages.ref_logps as ref_stage
import stages.tokenize as tokenize_stage
import stages.train as train_stage
from conftest import prepare_stages, tiny_params
from pipeline.core.errors import PipelineError
from pipeline.store.artifacts import check_inputs


@pytest.fixture
def prepared(tmp_path):
    """A fresh chain base → normalized → tokenized → ref_logps (manifests record where their inputs were)."""
    params = tiny_params(max_steps=2)
    prepare_stages(params, tmp_path, through="ref-logps")
    return params, tmp_path


def train(params, root):
    return train_stage.run(
        params,
        root / "tokenized",
        root / "ref_logps",
        root / "base",
        root / "train",
        root / "checkpoints",
        root / "live",
    )


def test_a_rewritten_row_of_the_tokenized_file_is_refused(prepared, tmp_path):
    params, root = prepared
    path = root / "tokenized" / "train.parquet"
    table = pq.read_table(path)
    ids = table.column("chosen_ids").to_pylist()
    ids[0] = list(reversed(ids[0]))
    pq.write_table(table.set_column(table.column_names.index("chosen_ids"), "chosen_ids", [ids]), path)
    with pytest.raises(PipelineError, match=r"tokenized/train\.parquet: its content differs .*dvc repro tokenize"):
        train(params, root)
    assert not (root / "train").exists()  # nothing written


def test_an_added_or_missing_file_is_refused(prepared, tmp_path):
    params, root = prepared
    (root / "ref_logps" / "extra.parquet").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"extra\.parquet: not part of the ref_logps artifact"):
        train(params, root)
    (root / "ref_logps" / "extra.parquet").unlink()
    (root / "base" / "model" / "config.json").unlink()
    with pytest.raises(PipelineError, match=r"config\.json: missing from the base artifact"):
        train(params, root)


def test_renormalizing_without_retokenizing_is_refused_downstream(prepared, tmp_path):
    params, root = prepared
    changed = json.loads(json.dumps(params))
    changed["data"]["builtin"]["num_pairs"] = 40
    normalize_stage.run(changed, root / "normalized")  # tokenized and ref_logps are now stale
    with pytest.raises(
        PipelineError, match=r"tokenized artifact was made from another normalized .*dvc repro tokenize"
    ):
        train(params, root)
    with pytest.raises(PipelineError, match=r"dvc repro tokenize"):
        ref_stage.run(params, root / "tokenized", root / "base", root / "ref_logps2")
    # re-tokenizing alone leaves the reference log-probs stale: they name their own stage
    tokenize_stage.run(changed, root / "normalized", root / "base", root / "tokenized")
    with pytest.raises(
        PipelineError, match=r"ref_logps artifact was made from another tokenized .*dvc repro ref-logps"
    ):
        train(params, root)
    ref_stage.run(changed, root / "tokenized", root / "base", root / "ref_logps")
    assert train(changed, root)["rows"]["train"] > 0


def test_a_changed_local_source_makes_its_artifacts_stale(tmp_path):
    params = tiny_params()
    from pipeline.data.sources import builtin_rows

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_rows(params, "train")))
    params["data"]["train"] = str(data)
    prepare_stages(params, tmp_path)
    check_inputs({"tokenized": tmp_path / "tokenized"})  # consistent so far
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one pair deleted
    with pytest.raises(
        PipelineError, match=r"pairs\.jsonl \(data\.train\) changed after `normalize`.*dvc repro normalize"
    ):
        check_inputs({"tokenized": tmp_path / "tokenized"})


def test_an_absent_upstream_artifact_does_not_block(prepared, tmp_path):
    params, root = prepared
    shutil.rmtree(root / "normalized")  # e.g. only the later stages were pulled from the remote
    assert set(check_inputs({"tokenized": root / "tokenized", "ref_logps": root / "ref_logps"})) == {
        "tokenized",
        "ref_logps",
    }
