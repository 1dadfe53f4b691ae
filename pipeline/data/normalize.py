"""normalize: raw rows from any source → canonical Parquet splits with stable `row_id`s + a report.

Rows stream through in chunks (see `sources`), so memory does not grow with the dataset: the
splits are written 1000 rows at a time, dropped rows go to `dropped.jsonl` as they are found, and
the duplicate check keeps its digests in an on-disk SQLite table.

Per raw row, in order: `data.columns` renames source columns to the canonical names, the
`data.preprocess` hook (`module:function`, like a `datasets.map` function: it gets the row and
returns the canonical columns, merged over the row; None skips the row), then `canonical_pair`
validates it and makes an implicit prompt explicit. A row that breaks a rule (`pipeline.data.invalid.RULES`) stops
the stage with the file, row and rule (`data.on_invalid: error`), or is dropped and listed with its
reason (`drop`). The first copy of a duplicated pair is kept; later ones are `duplicate_pair`
(an eval row that repeats a train row included, so eval never tests on training pairs).

Without `data.eval`, the eval split is carved from train: a seeded `eval_fraction` of the
*prompts* (so all pairs of one prompt land on the same side and eval prompts are unseen in training).

The report (and the manifest) records what was read (`report["sources"]`): each local source as given in
params with its digest, a Hub dataset with the commit its revision resolved to (which is what is read), the
preprocess hook's file. Under `dvc repro`, a local source that the stage's dvc.yaml deps do not cover is refused.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.core.errors import PipelineError
from pipeline.data.dropped import DROPPED_FILE, DroppedLog
from pipeline.data.formats import canonical_pair, invalid_row_message
from pipeline.data.images import ImageFiles
from pipeline.data.invalid import InvalidRow
from pipeline.data.schema import NORMALIZED_SCHEMA, encode_field, encode_optional, prompt_id_for, raw_row_id, row_id_for
from pipeline.data.sources import (
    builtin_rows,
    hook_record,
    is_builtin,
    iter_rows,
    load_hook,
    local_paths,
    local_reads,
    source_record,
)
from pipeline.store.artifacts import write_json
from pipeline.store.digests import glob_root, is_glob
from pipeline.store.dvc_deps import dvc_dep_paths, require_dvc_deps

CHUNK_ROWS = 1000
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "images", "image")


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


class SeenPairs:
    """The row_ids met so far, in an on-disk table: memory stays flat however many rows there are."""

    def __init__(self, directory: str):
        self.db = sqlite3.connect(Path(directory) / "seen.sqlite")
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE seen (row_id TEXT PRIMARY KEY) WITHOUT ROWID")
        self.cursor = self.db.cursor()

    def add(self, row_id: str) -> bool:
        """Record `row_id`; False if it was already there."""
        self.cursor.execute("INSERT OR IGNORE INTO seen VALUES (?)", (row_id,))
        return self.cursor.rowcount == 1

    def close(self) -> None:
        self.db.close()


def canonical_record(pair: dict) -> dict:
    conv = pair["conversational"]
    return {
        "row_id": row_id_for(
            pair["prompt"],
            pair["chosen"],
            pair["rejected"],
            pair["tools"],
            pair["chat_template_kwargs"],
            pair["images"],
        ),
        "conversational": conv,
        "prompt": encode_field(pair["prompt"], conv),
        "chosen": encode_field(pair["chosen"], conv),
        "rejected": encode_field(pair["rejected"], conv),
        "tools": encode_optional(pair["tools"]),
        "chat_template_kwargs": encode_optional(pair["chat_template_kwargs"]),
        "images": pair["images"],
    }


def check_column_mapping(columns: dict) -> dict:
    """`data.columns`: canonical name → the source's column name."""
    for canonical, source in columns.items():
        if canonical not in CANONICAL_COLUMNS:
            raise PipelineError(
                f"params: data.columns maps {canonical!r}, which is not a canonical column; "
                f"keys are canonical names {list(CANONICAL_COLUMNS)}, values the source's column names."
            )
        if not isinstance(source, str) or not source:
            raise PipelineError(f"params: data.columns.{canonical} must be the source's column name, got {source!r}.")
    return dict(columns)


class RowPreparer:
    """Raw row → canonical record: column mapping, the user's hook, validation (one dataset at a time)."""

    def __init__(self, data: dict, hook: Callable | None, image_files: ImageFiles | None = None):
        self.columns, self.hook, self.marker = check_column_mapping(data["columns"]), hook, data["prompt_marker"]
        self.image_files = image_files  # where the rows' image paths may be read
        self.known_columns: set = set()
        self.first_format: bool | None = None

    def __call__(self, raw: dict) -> dict:
        self.known_columns.update(raw)
        if len(raw) < len(self.known_columns):
            # JSON rows may omit a key other rows have: that is a null, as in a table
            raw = {**{column: None for column in self.known_columns}, **raw}
        if self.columns:
            missing = [source for source in self.columns.values() if source not in raw]
            if missing:
                raise InvalidRow(
                    "missing_column",
                    f"no {missing[0]!r} column, which data.columns maps (columns: {sorted(map(str, raw))})",
                )
            mapped = set(self.columns.values())
            raw = {
                **{k: v for k, v in raw.items() if k not in mapped},
                **{canonical: raw[source] for canonical, source in self.columns.items()},
            }
        if self.hook is not None:
            try:
                out = self.hook(dict(raw))
            except Exception as err:
                raise InvalidRow(
                    "preprocess_failed", f"the data.preprocess hook raised {type(err).__name__}: {err}"
                ) from None
            if out is None:
                raise InvalidRow("preprocess_skipped", "the data.preprocess hook returned None")
            if not isinstance(out, dict):
                raise InvalidRow(
                    "preprocess_failed",
                    f"the data.preprocess hook returned {type(out).__name__}, "
                    "expected a mapping of canonical columns (or None to skip)",
                )
            raw = {**raw, **out}
        pair = canonical_pair(raw, self.marker, self.image_files)
        if self.first_format is None:
            self.first_format = pair["conversational"]
        elif pair["conversational"] != self.first_format:
            kinds = {True: "conversational", False: "standard"}
            raise InvalidRow(
                "mixed_format",
                f"this row is {kinds[pair['conversational']]} but the dataset's first row "
                f"is {kinds[self.first_format]}; one dataset holds one format",
            )
        return pair


def image_files(source: str, data: dict) -> ImageFiles:
    """Where the image paths of a source's rows may be read: a relative path from the data file's directory (a
    glob's, or the directory itself; `data.image_root` for a Hub dataset, which has none); any file must lie in
    that directory or in `data.image_root`, and under DVC in a dep of the normalize stage too."""
    path = Path(source)
    own = (
        glob_root(source)
        if is_glob(source)
        else path
        if path.is_dir()
        else path.parent
        if local_paths(source)
        else None
    )
    named = Path(data["image_root"]) if data["image_root"] else None
    inside = tuple(root.resolve() for root in (own, named) if root is not None)
    deps = dvc_dep_paths()
    return ImageFiles(base=own or named, inside=inside, covered=None if deps is None else tuple(deps))


def _in_eval(prompt_id: str, seed: int, fraction: float) -> bool:
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "big") / 2**64
    return draw >= 1 - fraction  # a uniform draw in [0, 1): eval with probability `fraction`


class Normalizer:
    """One normalize run: the writers, the duplicate check, the dropped log and the counts."""

    def __init__(self, data: dict, writers: dict, seen: SeenPairs, dropped: DroppedLog):
        self.data, self.writers, self.seen, self.dropped = data, writers, seen, dropped
        self.rows_read = 0
        self.implicit_prompts = 0
        self.formats: dict[str, str] = {}

    def run(self, rows: Iterable, split_of: Callable[[dict], str], prepare: Callable[[dict], dict], desc: str) -> None:
        """Validate and write `rows` ((source, index, raw) triples); `split_of(pair)` picks the split. Under
        `data.on_invalid: error` the rows are all checked first and every invalid one named (`refuse_invalid`)."""
        invalid: list[tuple[str, int, InvalidRow]] = []
        for source, index, raw in tqdm(rows, desc=desc, unit=" rows", mininterval=2, disable=None):
            self.rows_read += 1
            row_id = None
            try:
                if isinstance(raw, InvalidRow):
                    raise raw
                pair = prepare(raw)
                record = canonical_record(pair)
                row_id = record["row_id"]
                if not self.seen.add(row_id):
                    raise InvalidRow("duplicate_pair", "same prompt, chosen, rejected and tools as an earlier row")
            except InvalidRow as bad:
                if self.data["on_invalid"] == "error" and bad.rule != "preprocess_skipped":
                    invalid.append((source, index, bad))  # every one is named: the scan goes on, nothing is written
                    continue
                self.dropped.add(
                    {
                        "source": source,
                        "row": index,
                        "row_id": row_id or (raw_row_id(raw) if isinstance(raw, dict) else None),
                        "rule": bad.rule,
                        "detail": bad.detail,
                    }
                )
                continue
            self.implicit_prompts += pair["implicit_prompt"]
            split = split_of(pair)
            self.formats.setdefault(split, "conversational" if pair["conversational"] else "standard")
            self.writers[split].add(record)
        if invalid:
            refuse_invalid(invalid)


NAMED_ROWS = 20  # invalid rows named in full in an error; the rest are counted


def refuse_invalid(invalid: list) -> None:
    """The error for invalid rows ((source, index, InvalidRow) in reading order): the first NAMED_ROWS, grouped by
    source, rule and detail, then how many more, and the fix."""
    groups: dict[tuple, list[int]] = {}
    for source, index, bad in invalid[:NAMED_ROWS]:
        groups.setdefault((source, bad.rule, bad.detail), []).append(index)
    lines = [invalid_row_message(source, rows, rule, detail) for (source, rule, detail), rows in groups.items()]
    more = f"; ... and {len(invalid) - NAMED_ROWS} more invalid rows" if len(invalid) > NAMED_ROWS else ""
    fix = "Fix the row" if len(invalid) == 1 else f"{len(invalid)} invalid rows. Fix them"
    raise PipelineError(
        "; ".join(lines) + more + f". {fix}, or set data.on_invalid: drop to skip such rows (they "
        "are listed in the report)."
    )


def data_sources(data: dict) -> dict:
    """What normalize reads, for the manifest: the train and eval sources and the preprocess hook (or None),
    each a record of `sources.source_record` / `sources.hook_record`. An eval source that is the train source
    shares its record, so both splits read the same commit of a Hub dataset."""
    eval_split = data["eval_split"] or data["split"]
    train = source_record(data["train"], data["split"], data["name"], data["revision"], "data.train")
    if data["eval"] is None:
        eval_ = None
    elif data["eval"] == data["train"] and train["kind"] == "hub":
        eval_ = {**train, "split": eval_split}
    else:
        eval_ = source_record(data["eval"], eval_split, data["name"], data["revision"], "data.eval")
    return {"train": train, "eval": eval_, "preprocess": hook_record(data["preprocess"])}


def revision_to_read(record: dict, data: dict) -> str | None:
    """The revision to read a source at: a Hub dataset's resolved commit when known, else data.revision."""
    return record.get("commit") or data["revision"]


def normalize_dataset(params: dict, out_dir: Path) -> dict:
    """Write `train.parquet`, `eval.parquet`, `dropped.jsonl`, `report.json` and `manifest.json` into `out_dir`."""
    data = params["data"]
    if data["prompt_marker"] is not None and (not isinstance(data["prompt_marker"], str) or not data["prompt_marker"]):
        raise PipelineError(
            f"params: data.prompt_marker must be a non-empty string or null, got {data['prompt_marker']!r}."
        )
    hook = load_hook(data["preprocess"])
    check_column_mapping(data["columns"])
    if data["image_root"] and not Path(data["image_root"]).is_dir():
        raise PipelineError(
            f"params: data.image_root={data['image_root']} is not a directory; name the directory the "
            "data's image paths are read from (relative to the project), or null."
        )
    require_dvc_deps(local_reads(data))
    sources = data_sources(data)
    needed = None if hook else set(data["columns"].values()) | set(CANONICAL_COLUMNS)
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="dpo-normalize-"))
        writers = {split: SplitWriter(out_dir / f"{split}.parquet") for split in ("train", "eval")}
        seen = SeenPairs(scratch)
        stack.callback(seen.close)
        dropped = DroppedLog(out_dir / DROPPED_FILE)
        stack.callback(dropped.close)
        run = Normalizer(data, writers, seen, dropped)
        if is_builtin(data["train"]):
            for split in ("train", "eval"):
                rows = ((data["train"], i, row) for i, row in enumerate(builtin_rows(params, split)))
                run.run(rows, lambda pair, s=split: s, RowPreparer({**data, "columns": {}}, None), f"normalize {split}")
            eval_from = "builtin"
        else:
            train_rows = iter_rows(
                data["train"], data["split"], data["name"], revision_to_read(sources["train"], data), columns=needed
            )
            if data["eval"] is None:

                def carve(pair: dict) -> str:
                    prompt_id = prompt_id_for(pair["prompt"], pair["tools"], pair["images"])
                    return "eval" if _in_eval(prompt_id, params["seed"], data["eval_fraction"]) else "train"

                run.run(train_rows, carve, RowPreparer(data, hook, image_files(data["train"], data)), "normalize")
                eval_from = (
                    f"carved from train: eval_fraction {data['eval_fraction']} of the prompts, seed {params['seed']}"
                )
            else:
                run.run(
                    train_rows,
                    lambda pair: "train",
                    RowPreparer(data, hook, image_files(data["train"], data)),
                    "normalize train",
                )
                eval_rows = iter_rows(
                    data["eval"],
                    data["eval_split"] or data["split"],
                    data["name"],
                    revision_to_read(sources["eval"], data),
                    columns=needed,
                )
                run.run(
                    eval_rows,
                    lambda pair: "eval",
                    RowPreparer(data, hook, image_files(data["eval"], data)),
                    "normalize eval",
                )
                eval_from = f"{data['eval']} (split {data['eval_split'] or data['split']})"
        for writer in writers.values():
            writer.close()
    rows = {split: w.count for split, w in writers.items()}
    report = {
        "rows_read": run.rows_read,
        "rows_written": rows,
        "rows_dropped": dropped.count,
        "dropped_by_reason": dict(sorted(dropped.by_reason.items())),
        "dropped_rows_file": DROPPED_FILE,
        "implicit_prompts": run.implicit_prompts,
        "formats": run.formats,
        "eval_from": eval_from,
        "on_invalid": data["on_invalid"],
        "sources": sources,
    }
    if report["rows_read"] != sum(rows.values()) + report["rows_dropped"]:
        raise RuntimeError("internal error: normalize counts do not add up")
    if rows["train"] == 0:
        raise PipelineError(
            f"{data['train']}: no valid training rows remain ({report['rows_read']} read, "
            f"{report['rows_dropped']} dropped: {report['dropped_by_reason']})."
        )
    write_json(out_dir / "report.json", report)
    return report
