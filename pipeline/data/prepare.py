"""In-process preparation: a raw `datasets` preference dataset → tokenized pairs for the trainer.

Uses the same validation, tokenization and truncation as the normalize and tokenize stages.
"""

from __future__ import annotations

from ..errors import PipelineError
from .formats import InvalidRow, canonical_pair
from .schema import row_id_for
from .tokenize import tokenize_pair, truncate_pair

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def is_tokenized(dataset) -> bool:
    return dataset is not None and set(TOKENIZED_COLUMNS) <= set(dataset.column_names or [])


def prepare_dataset(dataset, tokenizer, max_length: int | None, truncation_mode: str, num_proc: int | None = None,
                    name: str = "train_dataset"):
    """Tokenize a raw preference dataset (any supported format) unless it already is tokenized."""
    if dataset is None or is_tokenized(dataset):
        return dataset

    def convert(example: dict, index: int) -> dict:
        try:
            pair = canonical_pair(example)
            ids = truncate_pair(tokenize_pair(tokenizer, pair), max_length, truncation_mode)
        except InvalidRow as bad:
            raise PipelineError(f"{name}: row {index}: {bad.detail} [rule {bad.rule}].") from None
        return {"row_id": row_id_for(pair["prompt"], pair["chosen"], pair["rejected"], pair["tools"]), **ids}

    import datasets
    kwargs = {"num_proc": num_proc, "desc": f"tokenizing {name}"} if isinstance(dataset, datasets.Dataset) else {}
    prepared = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, **kwargs)
    # a completion emptied by truncation carries no preference signal
    return prepared.filter(lambda row: len(row["chosen_ids"]) > 0 and len(row["rejected_ids"]) > 0)
