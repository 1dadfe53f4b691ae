"""The reference pass: the reference model's log-probs over tokenized pairs, by `row_id`.

Memory stays flat in the number of pairs: pairs are read, scored and written a block at a time (one Parquet
row group, or one batch of a `datasets` map), and within a block they run in batches of similar length.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipeline.core.distributed import gather, gather_to_main, rank_and_size
from pipeline.data.processing import tokenizer_of
from pipeline.data.schema import REF_LOGPS_SCHEMA, SPLITS
from pipeline.model.batch_layout import BatchLayout
from pipeline.model.collator import DataCollatorForPreference, DataCollatorForVisionPreference
from pipeline.model.head import evaluating, token_values
from pipeline.model.layout import batch_layout
from pipeline.objective.reference import Reference
from pipeline.store.artifacts import read_manifest

REF_BLOCK_ROWS = 1024  # pairs read, scored and written at a time
REF_BATCH_TOKENS = 2**14  # padded tokens of one forward pass (chosen and rejected rows together), at most
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_columns(names) -> list[str]:
    """The columns a pair is scored from: its ids, and its images when the data has them."""
    return [*ID_COLUMNS, *(["images"] if "images" in names else [])]


REF_VALUE_SCHEMA = pa.schema([f for f in REF_LOGPS_SCHEMA if f.name != "row_id"])


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = REF_BATCH_TOKENS) -> list[list[int]]:
    """Indices of pairs of these padded lengths (prompt + the longer completion), shortest first, cut into batches
    of at most `batch_size` pairs whose chosen and rejected rows, padded, hold at most `max_tokens` tokens (a pair
    longer than that alone), so little compute goes to padding and no batch outgrows the budget."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and len(batches[-1]) < batch_size and 2 * (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_block(
    reference: Reference,
    block: pa.Table,
    collator: DataCollatorForPreference,
    batch_size: int,
    max_tokens: int = REF_BATCH_TOKENS,
    chunk_tokens: int | None = None,
) -> pa.Table:
    """The reference's summed and per-token completion log-probs of chosen and rejected for the pairs of `block`
    (its `prompt_ids`, `chosen_ids`, `rejected_ids`), in its order, as REF_VALUE_SCHEMA columns (per-token values
    float32 lists, built from the tensors without Python floats)."""
    model = reference.model
    device = next(model.parameters()).device
    ids = block.select(pair_columns(block.column_names))
    lengths = np.asarray(pc.list_value_length(ids["prompt_ids"]).fill_null(0)) + np.maximum(
        np.asarray(pc.list_value_length(ids["chosen_ids"]).fill_null(0)),
        np.asarray(pc.list_value_length(ids["rejected_ids"]).fill_null(0)),
    )
    order, parts = [], []
    with evaluating(model):
        for index in length_batches(lengths.tolist(), batch_size, max_tokens):
            batch = {k: v.to(device) for k, v in collator(ids.take(index).to_pylist()).items()}
            mask = batch["completion_mask"][:, 1:].bool()
            with reference.context():
                per_token = token_values(model, batch, mask, chunk_tokens=chunk_tokens).logps
            parts.append(ref_columns(per_token, mask))
            order += index
    if not parts:
        return REF_VALUE_SCHEMA.empty_table()
    return pa.concat_tables(parts).take(np.argsort(order))


def ref_columns(per_token: torch.Tensor, mask: torch.Tensor) -> pa.Table:
    """One batch's REF_VALUE_SCHEMA columns from its per-token log-probs ([2n, L-1]: chosen rows, then rejected)."""
    n = mask.shape[0] // 2
    sums = (per_token.double() * mask).sum(-1).cpu().numpy()
    lengths = mask.sum(-1).cpu().numpy()
    values = per_token[mask].float().cpu().numpy()  # row-major: every chosen row's tokens, then every rejected row's
    split = int(lengths[:n].sum())

    def lists(side_lengths, side_values):
        offsets = np.concatenate([[0], np.cumsum(side_lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(side_values, pa.float32()))

    return pa.Table.from_arrays(
        [
            pa.array(sums[:n]),
            pa.array(sums[n:]),
            lists(lengths[:n], values[:split]),
            lists(lengths[n:], values[split:]),
        ],
        schema=REF_VALUE_SCHEMA,
    )


def write_reference_logps(
    reference: Reference,
    tokenized_dir: Path,
    tokenizer,
    batch_size: int,
    out_dir: Path,
    max_tokens: int = REF_BATCH_TOKENS,
    prefix_sharing: bool = False,
    packing: bool = False,
    rows_per_rank: dict | None = None,
) -> dict:
    """The reference log-probs of every split of a tokenized artifact, as `<split>.parquet` in out_dir, streamed:
    each block of REF_BLOCK_ROWS pairs is read, scored and written as one row group before the next is read.
    Batches are prefix-shared and packed as asked where the model takes it (`pipeline.model.layout.batch_layout`).

    Under several processes the blocks are shared out (block k to rank k mod world size, blocks no larger than an
    even share) and scored a round of one block per rank at a time; rank 0 receives each round's blocks over the
    process group and writes them in order, so no rank repeats another's work, no file is shared between machines
    and memory stays flat. `rows_per_rank`, when given, receives each split's rows per rank. Returns the row
    counts."""
    rank, size = rank_and_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reference.model.to(device)
    read_manifest(tokenized_dir, "tokenized")
    pad_token_id = tokenizer_of(tokenizer).pad_token_id
    rows = {}
    for split in SPLITS:
        source = pq.ParquetFile(Path(tokenized_dir) / f"{split}.parquet")
        columns = pair_columns(source.schema_arrow.names)
        if "images" in columns:  # a vision split: padded batches with pixel inputs (as the trainer collates)
            collator = DataCollatorForVisionPreference(pad_token_id, processor=tokenizer)
        else:
            layout = batch_layout([reference.model], BatchLayout.of_options(prefix_sharing, packing))
            collator = DataCollatorForPreference(pad_token_id, **layout.options())
        total = source.metadata.num_rows
        block_rows = max(1, min(REF_BLOCK_ROWS, -(-total // size)))
        blocks = source.iter_batches(batch_size=block_rows, columns=["row_id", *columns])
        mine = 0
        writer = pq.ParquetWriter(Path(out_dir) / f"{split}.parquet", REF_LOGPS_SCHEMA) if rank == 0 else None
        with tqdm(total=total, desc=f"reference log-probs ({split})", unit="pairs", disable=rank != 0) as progress:
            while True:  # every rank reads each round's blocks (the file's row groups may cut them short)
                round_blocks = [next(blocks, None) for _ in range(size)]
                if round_blocks[0] is None:
                    break
                block = round_blocks[rank]  # and scores its own
                table = None
                if block is not None:
                    block = pa.Table.from_batches([block])
                    scored = score_block(reference, block, collator, batch_size, max_tokens)
                    table = pa.Table.from_arrays([block["row_id"], *scored.columns], schema=REF_LOGPS_SCHEMA)
                    mine += block.num_rows
                for done in gather_to_main(table) if size > 1 else [table]:
                    if writer is not None and done is not None:
                        writer.write_table(done, row_group_size=max(1, done.num_rows))  # one row group per block
                        progress.update(done.num_rows)
        if writer is not None:
            writer.close()
        rows[split] = total
        if rows_per_rank is not None:
            rows_per_rank[split] = gather(mine)
    return rows


def add_reference_logps(
    dataset,
    reference: Reference,
    collator: DataCollatorForPreference,
    batch_size: int,
    max_tokens: int = REF_BATCH_TOKENS,
    chunk_tokens: int | None = None,
):
    """`dataset` (a `datasets.Dataset` of tokenized pairs) with the reference's log-prob columns, streamed: a
    `map` over blocks of REF_BLOCK_ROWS pairs writes them to an Arrow file in `datasets`' temporary cache
    directory (removed at exit), which the result reads memory-mapped, beside the dataset's own columns."""
    import datasets
    from datasets.fingerprint import get_temporary_cache_files_directory

    name = f"ref_logps-{uuid.uuid4().hex}"  # never a cached result: the values depend on the reference model
    rank, size = rank_and_size()
    columns = pair_columns(dataset.column_names)
    ids = dataset.select_columns(columns)
    if size > 1:  # each rank scores a contiguous shard; the shards are gathered back in order
        ids = ids.shard(num_shards=size, index=rank, contiguous=True)
        name += f"-rank{rank}"
    scored = ids.with_format("arrow").map(
        lambda block: score_block(reference, block, collator, batch_size, max_tokens, chunk_tokens),
        batched=True,
        batch_size=REF_BLOCK_ROWS,
        remove_columns=columns,
        new_fingerprint=name,
        cache_file_name=os.path.join(get_temporary_cache_files_directory(), f"{name}.arrow"),
        load_from_cache_file=False,
        desc="reference log-probs",
    )
    if size > 1:
        scored = datasets.Dataset(pa.concat_tables(gather(scored.data.table.combine_chunks())))
    return datasets.concatenate_datasets([dataset, scored.with_format(None)], axis=1)
