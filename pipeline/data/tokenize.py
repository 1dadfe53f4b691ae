"""tokenize: canonical pairs → token ids of the prompt and of each completion, + a length report.

Conversational rows go through the tokenizer's chat template; the completion ids are the tail of
the templated prompt+completion after the templated prompt. Standard rows: the prompt is tokenized
with the tokenizer's special tokens, each completion without them and with EOS appended.
Truncation (`max_length`, `truncation_mode`) happens here, once, so reference log-probs and
training see the same tokens.
"""

from __future__ import annotations

import statistics
import warnings
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import write_json, write_manifest
from .formats import InvalidRow
from .schema import TOKENIZED_SCHEMA, decoded_row


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _strip_doubled_bos(ids: list[int], bos_id: int | None) -> list[int]:
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        return ids[1:]
    return ids


def tokenize_pair(tokenizer, row: dict) -> dict:
    """Untruncated ids of one decoded canonical row. Raises InvalidRow if the template breaks the prefix."""
    if row["conversational"]:
        kwargs = dict(row.get("chat_template_kwargs") or {})
        if row.get("tools"):
            kwargs["tools"] = row["tools"]
        prompt_ids = _ids(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, **kwargs))
        prompt_ids = _strip_doubled_bos(prompt_ids, tokenizer.bos_token_id)
        out = {"prompt_ids": prompt_ids}
        for name in ("chosen", "rejected"):
            full = _ids(tokenizer.apply_chat_template(row["prompt"] + row[name], tokenize=True, **kwargs))
            full = _strip_doubled_bos(full, tokenizer.bos_token_id)
            if full[:len(prompt_ids)] != prompt_ids:
                raise InvalidRow("prompt_not_prefix", f"the chat template renders the prompt differently once the {name} "
                                 "completion follows, so the completion cannot be located")
            out[f"{name}_ids"] = full[len(prompt_ids):]
        return out
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    out = {"prompt_ids": list(prompt_ids)}
    for name in ("chosen", "rejected"):
        ids = list(tokenizer(row[name], add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        out[f"{name}_ids"] = ids
    return out


def truncate_pair(ids: dict, max_length: int | None, mode: str) -> dict:
    """Fit prompt+completion of each side into `max_length` tokens; both sides keep the same prompt.

    keep_start keeps the prompt's start and cuts the completions' ends. keep_end (deprecated) drops
    the prompt's first tokens until the longer side fits, then cuts completion ends if still too long.
    """
    if max_length is None:
        return ids
    prompt = ids["prompt_ids"]
    longest = max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
    if mode == "keep_end":
        overflow = len(prompt) + longest - max_length
        prompt = prompt[max(0, overflow):]
    else:
        prompt = prompt[:max_length]
    room = max_length - len(prompt)
    return {"prompt_ids": prompt, "chosen_ids": ids["chosen_ids"][:room], "rejected_ids": ids["rejected_ids"][:room]}


def _length_stats(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    values = sorted(values)
    return {"count": len(values), "min": values[0], "max": values[-1], "mean": statistics.fmean(values),
            "p50": values[len(values) // 2], "p95": values[min(len(values) - 1, int(len(values) * 0.95))]}


def tokenize_split(tokenizer, in_path: Path, out_path: Path, max_length: int | None, mode: str, batch_size: int) -> dict:
    """Stream one normalized split through the tokenizer in record batches; returns its report."""
    counts = Counter()
    dropped = []
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    with pq.ParquetWriter(out_path, TOKENIZED_SCHEMA) as writer:
        for batch in pq.ParquetFile(in_path).iter_batches(batch_size=batch_size):
            records = []
            for record in batch.to_pylist():
                counts["rows_read"] += 1
                row = decoded_row(record)
                try:
                    full = tokenize_pair(tokenizer, row)
                except InvalidRow as bad:
                    dropped.append({"row_id": row["row_id"], "rule": bad.rule, "detail": bad.detail})
                    continue
                ids = truncate_pair(full, max_length, mode)
                cut = {name: len(full[f"{name}_ids"]) - len(ids[f"{name}_ids"]) for name in ("prompt", "chosen", "rejected")}
                if any(cut.values()):
                    counts["rows_truncated"] += 1
                counts["prompts_truncated"] += cut["prompt"] > 0
                for name in ("chosen", "rejected"):
                    counts[f"{name}_truncated"] += cut[name] > 0
                if not ids["chosen_ids"] or not ids["rejected_ids"]:
                    counts["completions_emptied"] += 1
                    dropped.append({"row_id": row["row_id"], "rule": "emptied_by_truncation",
                                    "detail": f"max_length={max_length} leaves no completion tokens"})
                    continue
                for name in lengths:
                    lengths[name].append(len(ids[f"{name}_ids"]))
                records.append({"row_id": row["row_id"], **ids})
            writer.write_table(pa.Table.from_pylist(records, schema=TOKENIZED_SCHEMA))
    counts["rows_written"] = counts["rows_read"] - len(dropped)
    return {**{k: int(v) for k, v in counts.items()}, "rows_dropped": len(dropped), "dropped": dropped,
            "lengths": {name: _length_stats(v) for name, v in lengths.items()}}


def tokenize_dataset(tokenizer, normalized_dir: Path, out_dir: Path, params: dict, inputs: dict) -> dict:
    cfg = params["tokenize"]
    if cfg["truncation_mode"] == "keep_end":
        warnings.warn("truncation_mode='keep_end' is deprecated: it cuts the start of the prompt; prefer keep_start.",
                      FutureWarning, stacklevel=2)
    report = {split: tokenize_split(tokenizer, normalized_dir / f"{split}.parquet", out_dir / f"{split}.parquet",
                                    cfg["max_length"], cfg["truncation_mode"], cfg["batch_size"])
              for split in ("train", "eval")}
    write_json(out_dir / "report.json", report)
    write_manifest(out_dir, "tokenize", inputs=inputs, params=cfg,
                   rows={split: r["rows_written"] for split, r in report.items()})
    return report
