"""In-process preparation: a raw `datasets` preference dataset → tokenized pairs for the trainer.

Uses the same validation (`formats.canonical_pair`), tokenization policy and truncation as the
normalize and tokenize stages; a row that breaks a rule is an error naming the row and the rule.
Pairs whose completions truncation empties are dropped, as in the tokenize stage.
"""

from __future__ import annotations

from ..errors import PipelineError
from .formats import InvalidRow, canonical_pair
from .schema import row_id_for
from .tokenize import PairTokenizer, truncate_pair, warn_keep_end

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def is_tokenized(dataset) -> bool:
    return dataset is not None and set(TOKENIZED_COLUMNS) <= set(dataset.column_names or [])


def prepare_dataset(dataset, tokenizer, max_length: int | None, truncation_mode: str, num_proc: int | None = None,
                    name: str = "train_dataset"):
    """Tokenize a raw preference dataset (any supported format) unless it already is tokenized."""
    if dataset is None or is_tokenized(dataset):
        return dataset
    warn_keep_end(truncation_mode)
    pair_tokenizer = PairTokenizer(tokenizer)

    def convert(batch: dict, indices: list[int]) -> dict:
        columns = list(batch)
        rows = [{column: batch[column][k] for column in columns} for k in range(len(indices))]
        pairs = []
        for index, row in zip(indices, rows):
            try:
                pairs.append(canonical_pair(row))
            except InvalidRow as bad:
                raise PipelineError(f"{name}: row {index}: {bad.detail} [rule {bad.rule}].") from None
        out = {"row_id": [], **{column: [] for column in TOKENIZED_COLUMNS}}
        for index, pair, encoded in zip(indices, pairs, pair_tokenizer.encode(pairs)):
            if isinstance(encoded, InvalidRow):
                raise PipelineError(f"{name}: row {index}: {encoded.detail} [rule {encoded.rule}].")
            ids = truncate_pair(encoded[0], max_length, truncation_mode, pair_tokenizer.bos_id)
            out["row_id"].append(row_id_for(pair["prompt"], pair["chosen"], pair["rejected"], pair["tools"],
                                            pair["chat_template_kwargs"]))
            for column in TOKENIZED_COLUMNS:
                out[column].append(ids[column])
        return out

    import datasets
    kwargs = {"num_proc": num_proc, "desc": f"tokenizing {name}"} if isinstance(dataset, datasets.Dataset) else {}
    prepared = dataset.map(convert, batched=True, batch_size=256, with_indices=True,
                           remove_columns=dataset.column_names, **kwargs)
    # a completion emptied by truncation carries no preference signal
    return prepared.filter(lambda row: len(row["chosen_ids"]) > 0 and len(row["rejected_ids"]) > 0)
