"""What the in-process API does with bad inputs, before any training step: invalid rows refused naming
every row, rule and the fix (on_invalid="error") or dropped and logged (on_invalid="drop"); an empty
dataset, a non-dataset, empty pre-tokenized completions and token ids the model cannot embed refused."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from pathlib import Path

import datasets
import pytest

from pipeline import DPOConfig, DPOTrainer
from pipeline.core.errors import PipelineError
from pipeline.data.prepare import prepare_dataset

HH = Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base-test-1200.jsonl.gz"  # MIT, see its README
HH_EMPTY_LAST_TURN = [86, 516, 925, 1103]  # rows whose chosen ends with an empty "Assistant:" turn
GOOD = [
    {"prompt": f"Is fact {i} true?", "chosen": f" Yes, fact {i} holds.", "rejected": f" No, fact {i} fails."}
    for i in range(6)
]
FIX = r'on_invalid="drop"'


def with_bad_rows():
    """GOOD with an empty implicit-prompt completion at row 1 and an identical pair at row 4."""
    rows = [dict(r) for r in GOOD]
    rows[1] = {"chosen": "Human: hi\n\nAssistant:", "rejected": "Human: hi\n\nAssistant: hello"}
    rows[4] = {"prompt": "Q", "chosen": " same", "rejected": " same"}
    return rows


def prepare(rows, tokenizer, max_length=256, **kwargs):
    return prepare_dataset(rows, tokenizer, max_length, "keep_start", **kwargs)


def trainer(tmp_path, model, tokenizer, train_dataset, **options):
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=2,
        max_steps=1,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        **options,
    )
    return DPOTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)


def test_on_invalid_is_a_checked_dpo_config_option():
    assert DPOConfig(output_dir="x").on_invalid == "error"
    with pytest.raises(PipelineError, match=r"on_invalid must be one of \['error', 'drop'\]"):
        DPOConfig(output_dir="x", on_invalid="skip")


def test_error_names_every_invalid_row_which_part_is_empty_and_the_fix(tiny_tokenizer):
    with pytest.raises(PipelineError) as err:
        prepare(datasets.Dataset.from_list(with_bad_rows()), tokenizer=tiny_tokenizer)
    message = str(err.value)
    assert message.startswith("train_dataset: row 1: chosen is empty after the prompt")
    assert "last assistant turn" in message and "[rule empty_completion]" in message
    assert "row 4: chosen and rejected are identical [rule identical_pair]" in message
    assert "(2 invalid rows of 6)" in message and FIX in message


def test_error_lists_the_first_twenty_rows_and_counts_the_rest(tiny_tokenizer):
    rows = [{"prompt": "Q", "chosen": " same", "rejected": " same"}] * 25 + GOOD
    with pytest.raises(PipelineError) as err:
        prepare(rows, tokenizer=tiny_tokenizer)
    message = str(err.value)
    assert f"rows {', '.join(map(str, range(20)))}: chosen and rejected are identical" in message
    assert "... and 5 more invalid rows (25 invalid rows of 31)" in message and FIX in message


def test_drop_removes_the_invalid_rows_and_logs_their_indices_and_rules(tiny_tokenizer, caplog):
    rows = with_bad_rows()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.prepare"):
        prepared = prepare(datasets.Dataset.from_list(rows), tokenizer=tiny_tokenizer, on_invalid="drop")
    assert len(prepared) == len(rows) - 2
    log = caplog.text
    assert "2 invalid rows of 6 dropped" in log and "rules: empty_completion, identical_pair" in log
    assert "train_dataset: row 1: chosen is empty after the prompt" in log and "row 4: chosen and rejected" in log


def test_an_empty_dataset_is_refused_before_training(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(PipelineError, match=r"train_dataset has no rows; pass a dataset with at least one"):
        trainer(tmp_path, tiny_model, tiny_tokenizer, datasets.Dataset.from_list([]))
    only_bad = [{"prompt": "Q", "chosen": " same", "rejected": " same"}]
    with pytest.raises(PipelineError, match=r"train_dataset: all 1 rows were dropped \(1 invalid"):
        trainer(tmp_path, tiny_model, tiny_tokenizer, only_bad, on_invalid="drop")


def test_a_list_of_row_dicts_is_accepted_and_anything_else_refused_naming_the_fix(tmp_path, tiny_model, tiny_tokenizer):
    run = trainer(tmp_path, tiny_model, tiny_tokenizer, GOOD)
    assert len(run.train_dataset) == len(GOOD) and "chosen_ids" in run.train_dataset.column_names
    with pytest.raises(
        PipelineError,
        match=r"train_dataset is a list whose item 1 is a str, not a row dict; pass a "
        r"datasets.Dataset, or a list of dicts",
    ):
        prepare([GOOD[0], "oops"], tokenizer=tiny_tokenizer)
    with pytest.raises(
        PipelineError,
        match=r"train_dataset is a DatasetDict with splits \['train'\]; pass one split, "
        r"e.g. train_dataset=dataset\['train'\]",
    ):
        prepare(datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD)}), tokenizer=tiny_tokenizer)
    with pytest.raises(PipelineError, match=r"train_dataset is a dict; pass a datasets.Dataset"):
        prepare({"prompt": ["Q"]}, tokenizer=tiny_tokenizer)


def tokenized(chosen_ids_of_row_2):
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]} for _ in range(4)]
    rows[2]["chosen_ids"] = chosen_ids_of_row_2
    return datasets.Dataset.from_list(rows)


def test_a_pre_tokenized_empty_completion_is_refused_or_dropped(tiny_tokenizer, caplog):
    with pytest.raises(PipelineError) as err:
        prepare(tokenized([]), tokenizer=tiny_tokenizer, vocab_size=100)
    assert "train_dataset: row 2: chosen_ids is empty (no completion tokens) [rule empty_completion]" in str(err.value)
    assert FIX in str(err.value)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.prepare"):
        kept = prepare(tokenized([]), tokenizer=tiny_tokenizer, vocab_size=100, on_invalid="drop")
    assert len(kept) == 3 and "row 2: chosen_ids is empty" in caplog.text


@pytest.mark.parametrize("bad_id", [-1, "vocab"])
def test_a_token_id_outside_the_model_vocabulary_is_refused_naming_row_column_and_size(
    tmp_path, tiny_model, tiny_tokenizer, bad_id
):
    vocab = tiny_model.get_input_embeddings().weight.shape[0]
    bad = vocab if bad_id == "vocab" else bad_id
    with pytest.raises(PipelineError) as err:
        trainer(tmp_path, tiny_model, tiny_tokenizer, tokenized([7, bad]))
    assert (
        f"train_dataset: row 2: chosen_ids holds token id {bad}, outside the model's vocabulary of {vocab} ids "
        f"[0, {vocab}) [rule token_out_of_vocab]"
    ) in str(err.value)
    assert FIX in str(err.value)


def test_an_iterable_dataset_stops_at_an_invalid_row_when_it_is_read(tiny_tokenizer):
    stream = datasets.Dataset.from_list(with_bad_rows()).to_iterable_dataset()
    prepared = prepare(stream, tokenizer=tiny_tokenizer)
    with pytest.raises(
        PipelineError,
        match=r"train_dataset: row 1: chosen is empty after the prompt.*"
        r"\[rule empty_completion\]\. .*on_invalid=\"drop\"",
    ):
        list(prepared)
    kept = prepare(
        datasets.Dataset.from_list(with_bad_rows()).to_iterable_dataset(), tokenizer=tiny_tokenizer, on_invalid="drop"
    )
    assert len(list(kept)) == 4


def test_hh_rlhf_empty_last_assistant_turns_are_all_named_or_dropped(tiny_tokenizer, caplog):
    with gzip.open(HH, "rt") as lines:
        rows = [json.loads(line) for line in itertools.islice(lines, 1200)]
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(PipelineError) as err:
        prepare(dataset, tokenizer=tiny_tokenizer)
    message = str(err.value)
    assert message.startswith(
        f"train_dataset: rows {', '.join(map(str, HH_EMPTY_LAST_TURN))}: chosen is empty after the prompt"
    )
    assert "the last assistant turn) has no text [rule empty_completion] (4 invalid rows of 1200)" in message
    assert FIX in message
    with caplog.at_level(logging.WARNING, logger="pipeline.data.prepare"):
        prepared = prepare(dataset, tokenizer=tiny_tokenizer, max_length=None, on_invalid="drop")
    assert len(prepared) == 1200 - len(HH_EMPTY_LAST_TURN)
    assert "4 invalid rows of 1200 dropped" in caplog.text and "rows 86, 516, 925, 1103" in caplog.text
