"""normalize: raw rows from any source → canonical Parquet splits with stable `row_id`s + a report."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import write_json, write_manifest
from ..errors import PipelineError
from .formats import InvalidRow, canonical_pair
from .schema import NORMALIZED_SCHEMA, encode_field, encode_optional, row_id_for
from .sources import builtin_rows, is_builtin, iter_rows

CHUNK_ROWS = 1000


class SplitWriter:
    """Streams canonical rows to one Parquet file in chunks, counting what it wrote."""

    def __init__(self, path: Path):
        self.path, self.buffer, self.count, self._writer = path, [], 0, None

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        self.count += 1
        if len(self.buffer) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, NORMALIZED_SCHEMA)
        if self.buffer:
            self._writer.write_table(pa.Table.from_pylist(self.buffer, schema=NORMALIZED_SCHEMA))
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self._writer.close()


def canonical_record(pair: dict) -> dict:
    conv = pair["conversational"]
    return {"row_id": row_id_for(pair["prompt"], pair["chosen"], pair["rejected"], pair["tools"]),
            "conversational": conv,
            "prompt": encode_field(pair["prompt"], conv), "chosen": encode_field(pair["chosen"], conv),
            "rejected": encode_field(pair["rejected"], conv), "tools": encode_optional(pair["tools"]),
            "chat_template_kwargs": encode_optional(pair["chat_template_kwargs"])}


def normalize_rows(rows: Iterable[dict], source: str, route, data_params: dict, report: dict) -> None:
    """Validate and canonicalize `rows`; `route(record)` returns the writer for a record's split."""
    seen: set[str] = set()
    dropped = report.setdefault("dropped", [])
    reasons = report.setdefault("dropped_by_reason", Counter())
    first_format = None
    for index, raw in enumerate(rows):
        report["rows_read"] += 1
        try:
            pair = canonical_pair(raw, data_params["prompt_marker"])
            first_format = first_format if first_format is not None else pair["conversational"]
            if pair["conversational"] != first_format:
                raise InvalidRow("mixed_format", "this row's format differs from the dataset's first row")
            record = canonical_record(pair)
            if record["row_id"] in seen:
                raise InvalidRow("duplicate_pair", f"same prompt, chosen and rejected as an earlier row (row_id {record['row_id']})")
        except InvalidRow as bad:
            if data_params["on_invalid"] == "error":
                raise PipelineError(f"{source}: row {index}: {bad.detail} [rule {bad.rule}]. Fix the row, or set "
                                    "data.on_invalid: drop to skip such rows (they are listed in the report).") from None
            dropped.append({"source": source, "row": index, "rule": bad.rule, "detail": bad.detail})
            reasons[bad.rule] += 1
            continue
        seen.add(record["row_id"])
        route(record).add(record)


def _in_eval(row_id: str, seed: int, fraction: float) -> bool:
    return random.Random(f"{seed}:{row_id}").random() < fraction


def normalize_dataset(params: dict, out_dir: Path) -> dict:
    """Write `train.parquet`, `eval.parquet`, `report.json` and `manifest.json` into `out_dir`."""
    data = params["data"]
    writers = {split: SplitWriter(out_dir / f"{split}.parquet") for split in ("train", "eval")}
    report = {"rows_read": 0, "sources": {}}
    if is_builtin(data["train"]):
        for split in ("train", "eval"):
            normalize_rows(builtin_rows(params, split), data["train"], lambda r, s=split: writers[s], data, report)
    else:
        hub = {"name": data["name"], "revision": data["revision"]}
        if data["eval"] is None:
            def route(record):
                return writers["eval" if _in_eval(record["row_id"], params["seed"], data["eval_fraction"]) else "train"]
            normalize_rows(iter_rows(data["train"], data["split"], **hub), data["train"], route, data, report)
        else:
            normalize_rows(iter_rows(data["train"], data["split"], **hub), data["train"], lambda r: writers["train"], data, report)
            normalize_rows(iter_rows(data["eval"], data["eval_split"] or data["split"], **hub), data["eval"],
                           lambda r: writers["eval"], data, report)
    for writer in writers.values():
        writer.close()
    rows = {split: w.count for split, w in writers.items()}
    report["rows_written"] = rows
    report["rows_dropped"] = len(report["dropped"])
    report["dropped_by_reason"] = dict(report["dropped_by_reason"])
    if report["rows_read"] != sum(rows.values()) + report["rows_dropped"]:
        raise RuntimeError("internal error: normalize counts do not add up")
    if rows["train"] == 0:
        raise PipelineError(f"{data['train']}: no valid training rows remain ({report['rows_read']} read, "
                            f"{report['rows_dropped']} dropped: {report['dropped_by_reason']}).")
    write_json(out_dir / "report.json", report)
    write_manifest(out_dir, "normalize", inputs={}, params={"seed": params["seed"], "data": data}, rows=rows)
    return report
