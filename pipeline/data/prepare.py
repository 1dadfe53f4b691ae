"""In-process preparation: a raw `datasets` preference dataset → tokenized pairs for the trainer.

Uses the same validation (`formats.canonical_pair`), tokenization policy and truncation as the
normalize and tokenize stages. A row that breaks a rule is handled by `DPOConfig.on_invalid`: "error"
refuses the dataset naming every offending row (the first MAX_LISTED and the count) and its rule,
"drop" removes those rows and logs their indices and rules. Pre-tokenized datasets are checked too:
an empty `chosen_ids`/`rejected_ids`, or a token id outside the model's vocabulary, is an invalid row.
Pairs whose completions truncation empties are dropped (logged), as in the tokenize stage. A dataset
left with no rows is refused before training. An IterableDataset is only read during training: a raw
one is checked row by row as it streams; a pre-tokenized one is not checked.

A plain list of row dicts is accepted and converted with `datasets.Dataset.from_list` (what the
reference docs' `Dataset.from_dict`/`from_list` examples would build); any other non-dataset is refused.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import PipelineError
from pipeline.data.formats import canonical_pair, invalid_row_message
from pipeline.data.images import IMAGE_COLUMNS
from pipeline.data.invalid import InvalidRow
from pipeline.data.schema import row_id_for
from pipeline.data.tokenize import PairTokenizer, image_tokens_cut, truncate_pair, warn_keep_end

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
COMPLETION_ID_COLUMNS = ("chosen_ids", "rejected_ids")
MAX_LISTED = 20  # invalid rows named one by one in an error or a log line; the rest are counted
_RULE, _DETAIL = "invalid_rule", "invalid_detail"  # what convert() marks an invalid row with
# the API's one rule beyond invalid.RULES: only the API meets token ids the model may not embed (a pre-tokenized
# dataset, or a tokenizer with added tokens the model was not resized for)
OUT_OF_VOCAB = "token_out_of_vocab"
FIX = 'Fix these rows, or pass DPOConfig(on_invalid="drop") to skip them (they are logged).'


def is_tokenized(dataset) -> bool:
    return dataset is not None and set(TOKENIZED_COLUMNS) <= set(dataset.column_names or [])


def as_dataset(dataset, name: str = "train_dataset"):
    """`dataset` as a `datasets` dataset: a list of row dicts is converted; anything else that is not one is refused."""
    import datasets

    if dataset is None or isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return dataset
    if isinstance(dataset, (list, tuple)):
        bad = next((i for i, row in enumerate(dataset) if not isinstance(row, dict)), None)
        if bad is not None:
            raise PipelineError(
                f"{name} is a list whose item {bad} is a {type(dataset[bad]).__name__}, not a row dict; "
                "pass a datasets.Dataset, or a list of dicts with prompt/chosen/rejected keys."
            )
        try:
            return datasets.Dataset.from_list(list(dataset))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
            raise PipelineError(
                f"{name}: the list of rows cannot be made into a dataset ({err}); give every row the "
                "same keys with the same kinds of values, or build it with datasets.Dataset.from_list "
                "yourself."
            ) from None
    if isinstance(dataset, datasets.DatasetDict):
        raise PipelineError(
            f"{name} is a DatasetDict with splits {list(dataset)}; pass one split, e.g. "
            f"{name}=dataset[{next(iter(dataset), 'train')!r}]."
        )
    raise PipelineError(
        f"{name} is a {type(dataset).__name__}; pass a datasets.Dataset (or IterableDataset), or a list "
        "of row dicts (e.g. datasets.Dataset.from_pandas(frame) for a DataFrame)."
    )


def input_vocab_size(model) -> int | None:
    """The number of token ids the model can embed (its input embedding rows), None when unknown. A weight that
    DeepSpeed ZeRO-3 partitioned keeps its real shape as `ds_shape`."""
    try:
        weight = model.get_input_embeddings().weight
        return int(getattr(weight, "ds_shape", weight.shape)[0])
    except (AttributeError, NotImplementedError, TypeError):
        return getattr(getattr(model, "config", None), "vocab_size", None)


def _listed(name: str, problems: list[tuple[int, str, str]]) -> str:
    """The first MAX_LISTED problems, rows with the same problem together ('name: rows 86, 516: detail [rule r];
    row 9: ...'), then how many more there are."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, rule, detail in problems[:MAX_LISTED]:
        groups.setdefault((rule, detail), []).append(index)
    shown = "; ".join(
        invalid_row_message(None if k else name, rows, rule, detail)
        for k, ((rule, detail), rows) in enumerate(groups.items())
    )
    more = len(problems) - MAX_LISTED
    return shown + (f"; ... and {more} more invalid rows" if more > 0 else "")


def _refuse_or_log(problems: list[tuple[int, str, str]], name: str, on_invalid: str, total: int) -> None:
    if not problems:
        return
    count = f"{len(problems)} invalid row{'s' if len(problems) > 1 else ''} of {total}"
    if on_invalid == "error":
        raise PipelineError(f"{_listed(name, problems)} ({count}). {FIX}")
    rules = ", ".join(sorted({rule for _, rule, _ in problems}))
    logger.warning("%s dropped (on_invalid='drop'; rules: %s): %s", count, rules, _listed(name, problems))


def tokenized_problems(dataset, vocab_size: int | None) -> list[tuple[int, str, str]]:
    """(row, rule, detail) of each row of a tokenized Dataset with an empty completion or an id outside
    [0, vocab_size), computed chunk by chunk on the Arrow columns (no copy of a memory-mapped column, no Python
    loop over rows)."""
    problems: dict[int, tuple[int, str, str]] = {}
    for column in TOKENIZED_COLUMNS:
        for start, ids in _chunks(dataset, column):
            if column in COMPLETION_ID_COLUMNS:
                lengths = pc.fill_null(pc.list_value_length(ids), 0)
                for row in pc.indices_nonzero(pc.equal(lengths, 0)).to_pylist():
                    problems.setdefault(
                        start + row, (start + row, "empty_completion", f"{column} is empty (no completion tokens)")
                    )
            if vocab_size is None:
                continue
            values, parents = pc.list_flatten(ids), pc.list_parent_indices(ids)
            outside = pc.fill_null(pc.or_(pc.less(values, 0), pc.greater_equal(values, vocab_size)), False)
            for position in pc.indices_nonzero(outside).to_pylist():
                row = start + parents[position].as_py()
                problems.setdefault(
                    row,
                    (
                        row,
                        OUT_OF_VOCAB,
                        f"{column} holds token id {values[position].as_py()}, "
                        f"outside the model's vocabulary of {vocab_size} ids [0, {vocab_size})",
                    ),
                )
    return sorted(problems.values())


def _chunks(dataset, column: str):
    """(first row, Arrow chunk) of one column of a map-style Dataset, in the dataset's row order."""
    values = dataset.with_format("arrow")[column]
    values = values.column(0) if isinstance(values, pa.Table) else values
    start = 0
    for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
        yield start, chunk
        start += len(chunk)


def _column(dataset, column: str) -> list:
    return [value for _, chunk in _chunks(dataset, column) for value in chunk.to_pylist()]


def _tokenize(dataset, tokenizer, max_length: int | None, truncation_mode: str, num_proc: int | None, name: str):
    """Raw rows → tokenized rows; an invalid row becomes a row with empty ids marked with its rule and detail."""
    warn_keep_end(truncation_mode)
    pair_tokenizer = PairTokenizer(tokenizer)
    vision = bool(set(IMAGE_COLUMNS) & set(dataset.column_names or []))

    def convert(batch: dict, indices: list[int]) -> dict:
        columns = list(batch)
        rows = [{column: batch[column][k] for column in columns} for k in range(len(indices))]
        out = {
            "row_id": [],
            **{column: [] for column in TOKENIZED_COLUMNS},
            _RULE: [],
            _DETAIL: [],
            **({"images": []} if vision else {}),
        }

        def add(row_id, ids: dict | None, bad: InvalidRow | None, images: list | None = None) -> None:
            out["row_id"].append(row_id)
            for column in TOKENIZED_COLUMNS:
                out[column].append(ids[column] if ids else [])
            out[_RULE].append(bad.rule if bad else None)
            out[_DETAIL].append(bad.detail if bad else None)
            if vision:
                out["images"].append(images)

        valid = []
        for index, row in zip(indices, rows):
            try:
                valid.append((index, canonical_pair(row)))
            except InvalidRow as bad:
                valid.append((index, bad))
        pairs = [pair for _, pair in valid if not isinstance(pair, InvalidRow)]
        encoded = iter(pair_tokenizer.encode(pairs))
        for index, pair in valid:
            if isinstance(pair, InvalidRow):
                add(None, None, pair)
                continue
            result = next(encoded)
            if isinstance(result, InvalidRow):
                add(None, None, result)
                continue
            ids = truncate_pair(result[0], max_length, truncation_mode, pair_tokenizer.bos_id)
            cut = image_tokens_cut(result[0], ids, pair_tokenizer.image_token_id, max_length)
            if cut is not None:
                add(None, None, cut)
                continue
            add(
                row_id_for(
                    pair["prompt"],
                    pair["chosen"],
                    pair["rejected"],
                    pair["tools"],
                    pair["chat_template_kwargs"],
                    pair["images"],
                ),
                ids,
                None,
                pair["images"],
            )
        return out

    import datasets

    kwargs = {"num_proc": num_proc, "desc": f"tokenizing {name}"} if isinstance(dataset, datasets.Dataset) else {}
    return dataset.map(
        convert, batched=True, batch_size=256, with_indices=True, remove_columns=dataset.column_names, **kwargs
    )


def _checked_iterable(prepared, name: str, on_invalid: str):
    """An IterableDataset is read lazily: an invalid row stops training when reached ("error") or is logged and
    skipped ("drop"), one at a time; truncation-emptied pairs are skipped."""

    def keep(row: dict, index: int) -> bool:
        if row[_RULE] is not None:
            message = invalid_row_message(name, index, row[_RULE], row[_DETAIL])
            if on_invalid == "error":
                raise PipelineError(f"{message}. {FIX}")
            logger.warning("%s (dropped: on_invalid='drop')", message)
            return False
        return all(len(row[column]) > 0 for column in COMPLETION_ID_COLUMNS)

    return prepared.filter(keep, with_indices=True).remove_columns([_RULE, _DETAIL])


def prepare_dataset(
    dataset,
    tokenizer,
    max_length: int | None,
    truncation_mode: str,
    num_proc: int | None = None,
    name: str = "train_dataset",
    on_invalid: str = "error",
    vocab_size: int | None = None,
):
    """Tokenize a raw preference dataset (any supported format) unless it already is tokenized, then check it:
    invalid rows refused or dropped per `on_invalid`, token ids below `vocab_size`, at least one row left."""
    import datasets

    dataset = as_dataset(dataset, name)
    if dataset is None:
        return None
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise PipelineError(f"{name} has no rows; pass a dataset with at least one preference pair.")
    tokenized = is_tokenized(dataset)
    if not tokenized:
        dataset = _tokenize(dataset, tokenizer, max_length, truncation_mode, num_proc, name)
        if isinstance(dataset, datasets.IterableDataset):
            return _checked_iterable(dataset, name, on_invalid)
    elif isinstance(dataset, datasets.IterableDataset):
        return dataset  # streamed: nothing to check before training (see the module docstring)
    total = len(dataset)
    if tokenized:
        problems = tokenized_problems(dataset, vocab_size)
        emptied = []
    else:
        marks, details = _column(dataset, _RULE), _column(dataset, _DETAIL)
        problems = [(i, rule, detail) for i, (rule, detail) in enumerate(zip(marks, details)) if rule is not None]
        dataset = dataset.remove_columns([_RULE, _DETAIL])
        bad_rows = {i for i, _, _ in problems}
        # ids the tokenizer made that the model cannot embed (a tokenizer with tokens added, model not resized)
        problems += [
            p for p in tokenized_problems(dataset, vocab_size) if p[0] not in bad_rows and p[1] == OUT_OF_VOCAB
        ]
        problems.sort()
        # a completion emptied by truncation carries no preference signal (dropped, as in the tokenize stage)
        lengths = [
            [n for _, chunk in _chunks(dataset, c) for n in pc.list_value_length(chunk).to_pylist()]
            for c in COMPLETION_ID_COLUMNS
        ]
        emptied = [i for i in range(total) if i not in bad_rows and not (lengths[0][i] and lengths[1][i])]
    _refuse_or_log(problems, name, on_invalid, total)
    dropped = {i for i, _, _ in problems} | set(emptied)
    if emptied:
        logger.warning(
            "%s: dropped %d pairs whose completions max_length=%s leaves empty [rule emptied_by_truncation]",
            name,
            len(emptied),
            max_length,
        )
    if dropped:
        dataset = dataset.select([i for i in range(total) if i not in dropped])
    if len(dataset) == 0:
        raise PipelineError(
            f"{name}: all {total} rows were dropped ({len(problems)} invalid, {len(emptied)} emptied by "
            f"max_length={max_length}); fix the data, or raise max_length."
        )
    return dataset
