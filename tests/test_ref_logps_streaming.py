"""The reference pass streams: it reads, scores and writes one block of pairs at a time (a Parquet row group, or a
`datasets` map batch written to disk), in token-bounded batches, and gives the values of a plain computation."""

from __future__ import annotations

import math
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline.run.reference_pass as ref
from conftest import reference_logps
from pipeline.data.schema import REF_LOGPS_SCHEMA, SPLITS, TOKENIZED_SCHEMA
from pipeline.model.collator import DataCollatorForPreference
from pipeline.objective.reference import Reference
from pipeline.run.reference_pass import add_reference_logps, length_batches, write_reference_logps
from pipeline.store.artifacts import write_manifest

BLOCK = 5


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(5, 100) for _ in range(k)]

    return [
        {
            "row_id": f"r{i}",
            "prompt_ids": ids(rng.randint(1, 7)),
            "chosen_ids": ids(rng.randint(1, 6)),
            "rejected_ids": ids(rng.randint(1, 6)),
        }
        for i in range(n)
    ]


ROWS = {"train": make_rows(13), "eval": make_rows(4, seed=1)}


def plain_token_logps(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p of each completion token (that has a predecessor), from the full logits of the pair alone."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1 :].tolist()


def assert_plain_values(model, rows: list[dict], got: dict[str, list]) -> None:
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            want = plain_token_logps(model, row["prompt_ids"], row[f"{side}_ids"])
            assert got[f"ref_{side}_token_logps"][i] == pytest.approx(want, rel=1e-5, abs=1e-5)
            assert got[f"ref_{side}_logps"][i] == pytest.approx(math.fsum(want), rel=1e-5, abs=1e-5)


@pytest.fixture
def tokenized(tmp_path):
    directory = tmp_path / "tokenized"
    directory.mkdir()
    for split in SPLITS:
        pq.write_table(
            pa.Table.from_pylist(ROWS[split], schema=TOKENIZED_SCHEMA), directory / f"{split}.parquet", row_group_size=4
        )
    write_manifest(directory, "tokenize", {}, {})
    return directory


@pytest.fixture
def events(monkeypatch):
    """What the pass does, in order: ("score", pairs) per block scored, ("write", pairs) per row group written."""
    log: list[tuple[str, int]] = []
    score = ref.score_block

    def scored(reference, block, *args, **kwargs):
        log.append(("score", block.num_rows))
        return score(reference, block, *args, **kwargs)

    class Writer(pq.ParquetWriter):
        def write_table(self, table, *args, **kwargs):
            log.append(("write", table.num_rows))
            super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(ref, "score_block", scored)
    monkeypatch.setattr(ref.pq, "ParquetWriter", Writer)
    monkeypatch.setattr(ref, "REF_BLOCK_ROWS", BLOCK)
    return log


def test_the_stage_writes_each_block_as_a_row_group_before_reading_the_next(
    tmp_path, tiny_model, tiny_tokenizer, tokenized, events
):
    out = tmp_path / "ref"
    out.mkdir()
    rows = write_reference_logps(
        Reference("policy", tiny_model, ""), tokenized, tiny_tokenizer, batch_size=2, out_dir=out
    )
    assert rows == {split: len(ROWS[split]) for split in SPLITS}
    blocks = [min(BLOCK, n - start) for split in SPLITS for n in [len(ROWS[split])] for start in range(0, n, BLOCK)]
    # strictly alternating: a block's values are written before the next block is scored, so at most one is held
    assert events == [(kind, n) for n in blocks for kind in ("score", "write")]
    for split in SPLITS:
        source = pq.ParquetFile(out / f"{split}.parquet")
        assert source.schema_arrow == REF_LOGPS_SCHEMA  # per-token values: float32 lists
        assert [source.metadata.row_group(i).num_rows for i in range(source.num_row_groups)] == [
            min(BLOCK, len(ROWS[split]) - s) for s in range(0, len(ROWS[split]), BLOCK)
        ]
        table = source.read()
        assert table["row_id"].to_pylist() == [r["row_id"] for r in ROWS[split]]  # the input order
        assert_plain_values(tiny_model, ROWS[split], table.to_pydict())


def test_the_in_process_precompute_maps_blocks_to_a_file_on_disk(tiny_model, tiny_tokenizer, events):
    dataset = datasets.Dataset.from_list(ROWS["train"])
    collator = DataCollatorForPreference(tiny_tokenizer.pad_token_id)
    out = add_reference_logps(dataset, Reference("policy", tiny_model, ""), collator, batch_size=3)
    n = len(ROWS["train"])
    assert events == [("score", min(BLOCK, n - start)) for start in range(0, n, BLOCK)]
    assert out.column_names == dataset.column_names + [f.name for f in REF_LOGPS_SCHEMA if f.name != "row_id"]
    assert out.cache_files  # the values are read memory-mapped from disk, not held in memory
    assert list(out["row_id"]) == [r["row_id"] for r in ROWS["train"]]
    assert_plain_values(tiny_model, ROWS["train"], out.to_dict())
    # the small in-memory form (Python lists), batched differently: the same values
    listed = reference_logps(Reference("policy", tiny_model, ""), ROWS["train"], collator, 4)
    assert listed["row_id"] == [r["row_id"] for r in ROWS["train"]]
    assert_plain_values(tiny_model, ROWS["train"], listed)


def test_batches_are_bounded_in_pairs_and_in_padded_tokens():
    lengths = [30, 5, 12, 7, 7, 40, 3, 25, 100]
    batches = length_batches(lengths, batch_size=3, max_tokens=120)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = 2 * len(batch) * max(lengths[i] for i in batch)  # chosen and rejected rows, padded to the longest
        assert len(batch) <= 3 and (padded <= 120 or len(batch) == 1)
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths)  # shortest first: little padding
    assert batches[-1] == [8]  # longer than the budget: alone


def test_the_default_budget_bounds_a_batch_of_long_pairs():
    batches = length_batches([1024] * 64, batch_size=64)
    assert all(2 * len(batch) * 1024 <= ref.REF_BATCH_TOKENS for batch in batches)
