"""Implicit prompts on real text: the committed HH-RLHF harmless-base sample (tests/data/hh-rlhf), read as text with a
turn marker and converted to the conversational format, must give the same prompts and completions."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import stages.normalize as normalize_stage
from pipeline.config.params import check_params
from pipeline.data.schema import decoded_row

HH = Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base-test-1200.jsonl.gz"  # MIT, see its README
MARKER = "\n\nAssistant:"
TURN = re.compile(r"\n\n(Human|Assistant): ?")
ROLE = {"Human": "user", "Assistant": "assistant"}
SPEAKER = {"user": "Human", "assistant": "Assistant"}


def to_messages(text: str) -> list[dict]:
    parts = TURN.split(text)
    assert parts[0] == ""
    return [{"role": ROLE[speaker], "content": content} for speaker, content in zip(parts[1::2], parts[2::2])]


def to_text(messages: list[dict]) -> str:
    return "".join(f"\n\n{SPEAKER[m['role']]}: {m['content']}" for m in messages)


def normalize(tmp_path, name, source, **data):
    out = tmp_path / name
    report = normalize_stage.run(check_params({"data": {"train": str(source), "on_invalid": "drop", **data}}), out)
    rows = [decoded_row(r) for split in ("train", "eval") for r in pq.read_table(out / f"{split}.parquet").to_pylist()]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    return report, rows, dropped


def test_text_with_a_turn_marker_and_conversational_give_the_same_prompts_and_completions(tmp_path):
    raw = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    conversational = tmp_path / "hh-conversational.jsonl"
    with open(conversational, "w", encoding="utf-8") as f:
        for row in raw:
            f.write(json.dumps({"chosen": to_messages(row["chosen"]), "rejected": to_messages(row["rejected"])}) + "\n")

    text_report, text_rows, text_dropped = normalize(tmp_path, "text", HH, prompt_marker=MARKER)
    conv_report, conv_rows, conv_dropped = normalize(tmp_path, "conv", conversational)

    assert text_report["rows_read"] == conv_report["rows_read"] == len(raw) == 1200
    # the same rows are dropped, for the same reasons (a few HH answers are empty)
    assert [(d["row"], d["rule"]) for d in text_dropped] == [(d["row"], d["rule"]) for d in conv_dropped]
    assert 0 < len(text_dropped) < 10
    # and every kept pair has the same prompt and completion texts by both routes
    assert all(r["prompt"].endswith(MARKER) for r in text_rows)
    from_conv = Counter(
        (
            to_text(r["prompt"]) + MARKER,
            " " + r["chosen"][0]["content"] + to_text(r["chosen"][1:]),
            " " + r["rejected"][0]["content"] + to_text(r["rejected"][1:]),
        )
        for r in conv_rows
    )
    from_text = Counter((r["prompt"], r["chosen"], r["rejected"]) for r in text_rows)
    assert from_text == from_conv and sum(from_text.values()) == len(raw) - len(text_dropped)


def test_without_a_marker_the_prompt_ends_between_words_and_the_marker_keeps_shared_words_in_the_answers(tmp_path):
    _, plain, _ = normalize(tmp_path, "plain", HH)
    _, marked, _ = normalize(tmp_path, "marked", HH, prompt_marker=MARKER)
    for row in plain:  # never inside a word: the cut is at whitespace, which goes to the completions
        assert not row["prompt"][-1].isspace() and row["chosen"][0].isspace() and row["rejected"][0].isspace()
    full = {(r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]): r for r in marked}
    moved = 0
    for row in plain:
        twin = full[(row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])]
        assert row["prompt"].startswith(twin["prompt"])
        shared = row["prompt"][len(twin["prompt"]) :]  # words both answers start with
        if shared:
            moved += 1
            assert twin["chosen"].startswith(shared) and twin["rejected"].startswith(shared)
    # common (79 of the 1,200 pairs): both answers open with "I", "That's", ...; the marker keeps them in the answers
    assert moved > len(plain) // 20


def test_under_error_every_empty_final_turn_is_named_with_the_part_that_is_empty(tmp_path):
    from pipeline.core.errors import PipelineError

    params = check_params({"data": {"train": str(HH), "prompt_marker": MARKER, "on_invalid": "error"}})
    with pytest.raises(PipelineError) as caught:
        normalize_stage.run(params, tmp_path / "out")
    message = str(caught.value)
    assert (
        "rows 86, 516, 925, 1103:" in message and "after the prompt" in message and "[rule empty_completion]" in message
    )
    assert "4 invalid rows. Fix them, or set data.on_invalid: drop" in message
    assert not (tmp_path / "out").exists()  # nothing written
