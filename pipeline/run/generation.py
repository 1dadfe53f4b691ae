"""The answers of a policy to the train split's prompts (`dpo generate`): what iterative rounds pair and train on.

Prompts are the distinct prompts of the normalized train split, shuffled with the seed and cut to
generate.num_prompts. Each gets generate.num_samples sampled answers; batch k of round r is seeded with
`seed + 1000 * r + k`, so the same seed, round and number of processes give the same answers. Every process answers
its share of the prompts (`pipeline.core.distributed`); process zero writes the table.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.distributed import gather_shares, my_share
from pipeline.data.images import IMAGE_TYPE
from pipeline.data.schema import decoded_row, prompt_id_for
from pipeline.judge.sampling import Sampling, generate_answers

SAMPLES_FILE = "samples.parquet"
SAMPLES_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),  # the first train pair with this prompt: where the prompt came from
        ("prompt_id", pa.string()),  # the prompt's digest (`prompt_id_for`): the answers of one prompt share it
        ("conversational", pa.bool_()),
        ("prompt", pa.string()),  # as the normalized artifact stores it (JSON text for chat messages)
        ("tools", pa.string()),
        ("chat_template_kwargs", pa.string()),
        ("images", pa.list_(IMAGE_TYPE)),
        ("sample", pa.int32()),  # the answer's index among its prompt's, 0 .. num_samples-1
        ("answer", pa.string()),
        ("policy", pa.string()),  # the policy's identity: the digest of the base artifact that names it
    ]
)
PROMPT_COLUMNS = SAMPLES_SCHEMA.names[:7]  # what a sample keeps of its prompt's normalized record
SEED_STRIDE = 1000  # round r's batches are seeded from seed + 1000 r: rounds never share a sampling stream


def train_prompts(normalized: Path, limit: int | None, seed: int) -> list[dict]:
    """The distinct prompts of the normalized train split (each as its first pair's record), shuffled with `seed`,
    at most `limit` (None: all)."""
    seen, prompts = set(), []
    for record in pq.read_table(Path(normalized) / "train.parquet").to_pylist():
        row = decoded_row(record)
        key = prompt_id_for(row["prompt"], row["tools"], row["images"])
        if key not in seen:
            seen.add(key)
            prompts.append({**record, "prompt_id": key})
    random.Random(seed).shuffle(prompts)
    return prompts[:limit] if limit is not None else prompts


def sampling_of(params: dict, round_number: int) -> Sampling:
    cfg = params["generate"]
    return Sampling(
        max_new_tokens=cfg["max_new_tokens"],
        batch_size=cfg["batch_size"],
        do_sample=True,
        temperature=cfg["temperature"],
        top_p=cfg["top_p"],
        num_samples=cfg["num_samples"],
        seed=params["seed"] + SEED_STRIDE * round_number,
    )


def sample_answers(model, processing_class, records: list[dict], sampling: Sampling, policy: str) -> pa.Table:
    """`sampling.num_samples` answers of `model` to each prompt record, one row per answer (SAMPLES_SCHEMA)."""
    rows = [decoded_row(r) for r in records]
    prompts = [{"prompt": row["prompt"], "images": row["images"]} for row in rows]
    answers = gather_shares(generate_answers(model, processing_class, my_share(prompts), sampling), len(prompts))
    return pa.Table.from_pylist(
        [
            {**{k: record.get(k) for k in PROMPT_COLUMNS}, "sample": i, "answer": answer, "policy": policy}
            for record, answers_of_prompt in zip(records, answers)
            for i, answer in enumerate(answers_of_prompt)
        ],
        schema=SAMPLES_SCHEMA,
    )


def write_samples(table: pa.Table, out_dir: Path) -> None:
    pq.write_table(table, Path(out_dir) / SAMPLES_FILE)
