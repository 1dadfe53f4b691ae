"""Where raw preference rows come from, streamed: local files, `save_to_disk` directories, the Hub.

Every reader yields `(source, index, row)`: `source` names the file (or dataset id and split) for
error messages, `index` is the 0-based row number within it, and `row` is a dict, or an `InvalidRow`
when the source cannot be parsed at that row (a bad JSON line), so the caller's `on_invalid` policy
decides. Nothing reads a whole file into memory:

- JSON Lines (`.jsonl`, `.json` with one object per line) and JSON arrays (`.json` starting with
  `[`) are parsed incrementally with the standard `json` module (strictly), so values come back exactly
  as written (no Arrow type unification). `.gz`, `.bz2`, `.xz` (and `.zst` with `zstandard`) work.
- CSV goes through the `csv` module (strict quoting), one row at a time; empty cells read as null.
- Parquet is read one record batch at a time.
- a `datasets.save_to_disk` directory is memory-mapped (`load_from_disk`) and read in batches.
- anything else (a Hub dataset id, or a local directory laid out like a Hub dataset repository) goes
  through `datasets.load_dataset(source, name, split=split, revision=revision)`, which prepares a
  memory-mapped Arrow cache; it is then read in batches.
- a glob pattern (`data/train-*.jsonl`) reads the matching files in name order.

The file readers live in `readers`, which says what is unreadable and what then happens: an unreadable JSON
line is an `InvalidRow`; a file that cannot be read past some point (bad compression, a corrupt Parquet
file or Arrow batch, a broken JSON array, an unclosed CSV quote) is a `PipelineError` naming where.

What a source is, for the normalized manifest, is `source_record`: `local` (the path as given in params and
`source_digest`, which the lineage check can recompute), `hub` (the revision asked for and the commit it
resolved to, `pipeline.store.hub`), or `builtin`; `hook_record` records the preprocess hook's file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from pipeline.builtin import BUILTIN_DATASETS, BUILTIN_VISION_DATA, task
from pipeline.core.errors import PipelineError
from pipeline.data import readers
from pipeline.data.invalid import InvalidRow
from pipeline.store.digests import MISSING_FIX, file_digest, glob_files, is_glob, source_digest
from pipeline.store.hub import resolve_commit

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BATCH_ROWS = 1000
READ_CHUNK = 1 << 20  # characters read at a time from a JSON array

RowStream = Iterator[tuple[str, int, "dict | InvalidRow"]]


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in COMPRESSIONS]
    return suffixes[-1] if suffixes else ""


def read_json(path: Path) -> RowStream:
    return readers.read_json(path, READ_CHUNK)


def read_csv(path: Path) -> RowStream:
    return readers.read_csv(path)


ARROW_ERRORS = (OSError, ValueError)  # pyarrow.ArrowInvalid is a ValueError; ArrowIOError an OSError


def _arrow_batches(
    tables,
    label: str,
    columns: set | None,
    where: Callable[[int], str] = lambda index: "",
    fix: str = "re-create it, or re-download it",
) -> RowStream:
    """The rows of Arrow batches; a batch that cannot be read stops with the row it got to and the fix."""
    index, tables = 0, iter(tables)
    while True:
        try:
            table = next(tables, None)
            if table is None:
                return
            if columns is not None:
                table = table.select([c for c in table.column_names if c in columns])
            rows = table.to_pylist()
        except PipelineError:
            raise
        except ARROW_ERRORS as err:
            raise PipelineError(
                f"{label}: cannot read the rows from row {index}{where(index)} ({type(err).__name__}: "
                f"{err}); the data is corrupt or truncated: {fix}."
            ) from None
        for row in rows:
            yield label, index, row
            index += 1


PARQUET_FIX = "re-create it (pyarrow.parquet.write_table, pandas.DataFrame.to_parquet) or re-download it"


def _row_group_at(parquet, row: int) -> str:
    """' (row group g, from byte offset b)': where in a Parquet file `row` lies, for messages."""
    try:
        first = 0
        for group in range(parquet.metadata.num_row_groups):
            meta = parquet.metadata.row_group(group)
            if row < first + meta.num_rows:
                column = meta.column(0)
                return (
                    f" (row group {group}, from byte offset {column.dictionary_page_offset or column.data_page_offset})"
                )
            first += meta.num_rows
    except Exception:  # the metadata itself is damaged: the row number has to do
        pass
    return ""


def read_parquet(path: Path, columns: set | None = None) -> RowStream:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = None if columns is None else [c for c in parquet.schema_arrow.names if c in columns]
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=names)
    except ARROW_ERRORS as err:
        raise PipelineError(
            f"{path}: not a readable Parquet file ({path.stat().st_size} bytes; {type(err).__name__}: "
            f"{err}); {PARQUET_FIX}. If it is another format, give it that format's suffix."
        ) from None
    yield from _arrow_batches(batches, str(path), None, lambda row: _row_group_at(parquet, row), PARQUET_FIX)


def read_dataset(dataset, label: str, columns: set | None = None) -> RowStream:
    """A `datasets.Dataset`, read in Arrow batches (memory-mapped: nothing is copied whole)."""
    yield from _arrow_batches(
        dataset.with_format("arrow").iter(batch_size=BATCH_ROWS),
        label,
        columns,
        fix="re-create it (Dataset.save_to_disk), or for a Hub dataset clear its datasets cache",
    )


def is_save_to_disk_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json"))


HUB_FIX = (
    "For a Hub id check the name, config (data.name), split and revision, and the network (HF_HUB_OFFLINE); "
    "for a local file check its format."
)


def _load(loader: Callable, source: str, fix: str = HUB_FIX):
    try:
        return loader()
    except PipelineError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the source and the cause
        raise PipelineError(f"{source}: could not load the dataset ({type(err).__name__}: {err}). {fix}") from None


def _read_file(path: Path, columns: set | None) -> RowStream:
    kind = LOCAL_FORMATS.get(_suffix(path))
    if kind is None:
        raise PipelineError(
            f"{path}: unsupported file type; use .json, .jsonl, .parquet or .csv "
            f"(optionally compressed: {', '.join(COMPRESSIONS)})."
        )
    if kind == "parquet":
        return read_parquet(path, columns)
    return read_csv(path) if kind == "csv" else read_json(path)


def _require_existing_path(source: str, key: str | None = None) -> None:
    """A source spelled like a path (a suffix, or ./ / ~) must exist: it is not a Hub id."""
    path = Path(source)
    if not path.exists() and (path.suffix or source.startswith((".", "/", "~"))):
        raise PipelineError(f"{f'{key}=' if key else ''}{source}: no such file or directory; {MISSING_FIX}.")


def iter_rows(
    source: str, split: str = "train", name: str | None = None, revision: str | None = None, columns: set | None = None
) -> RowStream:
    """Stream the rows of `source` (see the module docstring); `columns` limits what Arrow sources read."""
    import datasets

    path = Path(source)
    if is_glob(source):
        for file in glob_files(source):
            yield from _read_file(file, columns)
        return
    if path.is_file():
        yield from _read_file(path, columns)
        return
    label = f"{source}[{split}]"
    if is_save_to_disk_dir(path):
        loaded = _load(
            lambda: datasets.load_from_disk(str(path)),
            source,
            "The save_to_disk directory is corrupt or truncated: re-create it with Dataset.save_to_disk.",
        )
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PipelineError(
                    f"{source}: no split {split!r} (splits: {sorted(loaded)}); set data.split / data.eval_split."
                )
            loaded = loaded[split]
        yield from read_dataset(loaded, label, columns)
        return
    _require_existing_path(source)
    # a Hub dataset id, or a local directory laid out like a Hub dataset repository
    loaded = _load(lambda: datasets.load_dataset(source, name, split=split, revision=revision), source)
    yield from read_dataset(loaded, label, columns)


def load_hook(spec: str | None) -> Callable[[dict], dict | None] | None:
    """The user's preprocessing function from `module:function` or `path/to/file.py:function`."""
    if not spec:
        return None
    if not isinstance(spec, str):
        raise PipelineError(
            f"params: data.preprocess must be 'module:function' or 'path/to/file.py:function', got {spec!r}."
        )
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise PipelineError(
            f"params: data.preprocess must be 'module:function' or 'path/to/file.py:function', got {spec!r}."
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise PipelineError(f"params: data.preprocess: no such file {module_name}.")
            spec_ = importlib.util.spec_from_file_location(f"dpo_preprocess_{path.stem}", path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path and "" not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # a module next to params.yaml
            module = importlib.import_module(module_name)
    except PipelineError:
        raise
    except Exception as err:
        raise PipelineError(
            f"params: data.preprocess: cannot import {module_name} ({type(err).__name__}: {err})."
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise PipelineError(f"params: data.preprocess: {module_name} has no function {function_name!r}.")
    return function


def builtin_rows(params: dict, split: str) -> list[dict]:
    """The built-in task's pairs; train and eval use disjoint prompts (vision-colors: pictures of other seeds)."""
    cfg = params["data"]["builtin"]
    if params["data"]["train"] == BUILTIN_VISION_DATA:
        from pipeline.builtin import vision_task

        seed = params["seed"] + (1 if split == "train" else 2)
        return vision_task.preference_pairs(cfg["num_pairs" if split == "train" else "num_eval_pairs"], seed=seed)
    train_prompts, eval_prompts = task.split_prompts(params["seed"], params["data"]["eval_fraction"])
    if split == "train":
        return task.preference_pairs(train_prompts, cfg["num_pairs"], seed=params["seed"] + 1)
    return task.preference_pairs(eval_prompts, cfg["num_eval_pairs"], seed=params["seed"] + 2)


def is_builtin(source: str | None) -> bool:
    return source in BUILTIN_DATASETS


# ---- what a source is, for the normalized manifest and the DVC check ---------------------------------


def local_paths(source: str) -> list[Path]:
    """The local files and directories `source` reads (a file, a directory, a glob's matches); [] for a Hub id
    or the built-in task."""
    if is_builtin(source):
        return []
    if is_glob(source):
        return glob_files(source)
    return [Path(source)] if Path(source).exists() else []


def source_record(source: str, split: str, name: str | None, revision: str | None, key: str) -> dict:
    """The manifest's record of a data source: built-in, local (path as given in params + digest), or a Hub
    dataset with the revision asked for and the commit it resolved to (None when offline and not cached)."""
    if is_builtin(source):
        return {"kind": "builtin", "name": source}
    if local_paths(source):
        return {"kind": "local", "path": source, "sha256": source_digest(source, key)}
    _require_existing_path(source, key)
    commit = resolve_commit(source, revision, "dataset", key=key, revision_key="data.revision")
    return {"kind": "hub", "repo_id": source, "name": name, "split": split, "revision": revision, "commit": commit}


def hook_file(spec: str | None) -> Path | None:
    """The file that defines the `data.preprocess` hook (`file.py:function`, or a module's file)."""
    if not spec:
        return None
    module_name = spec.rpartition(":")[0]
    if module_name.endswith(".py"):
        return Path(module_name)
    found = importlib.util.find_spec(module_name)
    return Path(found.origin) if found and found.origin and Path(found.origin).is_file() else None


def hook_record(spec: str | None) -> dict | None:
    """The manifest's record of the `data.preprocess` hook: a file as given in params, or a module by name,
    with the digest of the file that defines it."""
    if not spec:
        return None
    module_name, path = spec.rpartition(":")[0], hook_file(spec)
    digest = file_digest(path) if path is not None else None  # None: a module without a file (built in)
    if module_name.endswith(".py"):
        return {"kind": "local", "path": module_name, "sha256": digest}
    return {"kind": "module", "module": module_name, "sha256": digest}


def _installed(path: Path) -> bool:
    """Whether `path` belongs to an installed package or the standard library (not to the project)."""
    roots = {Path(sysconfig.get_paths()[name]).resolve() for name in ("purelib", "platlib", "stdlib", "platstdlib")}
    return any(root in path.resolve().parents for root in roots)


def local_reads(data: dict) -> list[tuple[str, str, list[Path]]]:
    """(params key, value as given, local paths) of every local input of normalize: the train and eval sources,
    data.image_root, and the preprocess hook's file (a module's too, unless it is installed)."""
    reads = [
        (key, data[field], local_paths(data[field]))
        for key, field in (("data.train", "train"), ("data.eval", "eval"))
        if data[field]
    ]
    if data.get("image_root"):
        reads.append(("data.image_root", data["image_root"], [Path(data["image_root"])]))
    hook = hook_file(data["preprocess"])
    if hook is not None and not _installed(hook):
        reads.append(("data.preprocess", data["preprocess"].rpartition(":")[0], [hook]))
    return [read for read in reads if read[2]]
