"""Every normalize validation rule under both policies: `error` names the file, row and rule and
writes nothing; `drop` writes the other rows and lists the dropped one with its reason; counts add up."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

import stages.normalize as normalize_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.data.invalid import RULES
from pipeline.data.schema import decoded_row

TEXT = [
    {"prompt": f"Is fact {i} true?", "chosen": f" Yes, fact {i} holds.", "rejected": f" No, fact {i} fails."}
    for i in range(5)
]
CONV = [
    {
        "prompt": [{"role": "user", "content": f"Fact {i}?"}],
        "chosen": [{"role": "assistant", "content": f"True {i}."}],
        "rejected": [{"role": "assistant", "content": f"False {i}."}],
    }
    for i in range(5)
]
ASK = [{"role": "user", "content": "Fact?"}]
YES, NO = [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}]
# vision rows: an image part in the prompt, the image a path relative to the data file (write_source writes pic.png)
PICTURED = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
VISION = [
    {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Colour {i}?"}]}],
        "chosen": YES,
        "rejected": NO,
        "images": ["pic.png"],
    }
    for i in range(5)
]

# rule -> (the good rows around it, the bad row as a JSON line, the bad row's index)
CASES = {
    "malformed_row": (TEXT, '{"prompt": "Q", "chosen": " a", "rejected": ', 2),
    "missing_column": (TEXT, {"prompt": "Q", "chosen": " a"}, 0),
    "null_field": (TEXT, {"prompt": "Q", "chosen": " a"}, 2),  # absent here, present in other rows: null
    "bad_type": (TEXT, {"prompt": "Q", "chosen": {"text": "a"}, "rejected": " b"}, 2),
    "mixed_format": (TEXT, {"prompt": ASK, "chosen": YES, "rejected": NO}, 2),  # a conversational row among text rows
    "bad_message": (CONV, {"prompt": ASK, "chosen": ["Yes."], "rejected": NO}, 2),
    "unknown_role": (CONV, {"prompt": [{"role": "human", "content": "Fact?"}], "chosen": YES, "rejected": NO}, 2),
    "non_string_content": (CONV, {"prompt": [{"role": "user", "content": 7}], "chosen": YES, "rejected": NO}, 2),
    "bad_tool_call": (
        CONV,
        {"prompt": ASK, "chosen": [{"role": "assistant", "tool_calls": "add(1, 2)"}], "rejected": NO},
        2,
    ),
    "no_prompt": (TEXT, {"chosen": "Yes it is.", "rejected": "No way."}, 2),
    "empty_completion": (TEXT, {"prompt": "Q", "chosen": "   ", "rejected": " b"}, 2),
    "completion_not_assistant": (CONV, {"prompt": ASK, "chosen": ASK + YES, "rejected": NO}, 2),
    "identical_pair": (CONV, {"chosen": ASK + YES, "rejected": ASK + YES}, 2),
    "bad_tools_json": (CONV, {"prompt": ASK, "chosen": YES, "rejected": NO, "tools": "{not json"}, 2),
    "bad_chat_template_kwargs": (
        CONV,
        {"prompt": ASK, "chosen": YES, "rejected": NO, "chat_template_kwargs": "yes"},
        2,
    ),
    "template_fields_on_text": (
        TEXT,
        {"prompt": "Q", "chosen": " a", "rejected": " b", "tools": [{"type": "function"}]},
        2,
    ),
    "duplicate_pair": (
        TEXT,
        {
            "chosen": TEXT[0]["prompt"] + TEXT[0]["chosen"],  # the first pair, with an implicit prompt
            "rejected": TEXT[0]["prompt"] + TEXT[0]["rejected"],
        },
        2,
    ),
    "preprocess_failed": (TEXT, {"prompt": "Q", "chosen": " a", "rejected": " b", "explode": True}, 2),
    "bad_image": (VISION, {"prompt": PICTURED, "chosen": YES, "rejected": NO, "images": ["missing.png"]}, 2),
    "image_count_mismatch": (VISION, {"prompt": PICTURED, "chosen": YES, "rejected": NO, "images": ["pic.png"] * 2}, 2),
    "image_outside_source": (VISION, {"prompt": PICTURED, "chosen": YES, "rejected": NO, "images": ["../pic.png"]}, 2),
    "images_on_text": (TEXT, {"prompt": "Q", "chosen": " a", "rejected": " b", "images": ["pic.png"]}, 2),
}
HOOK = "def hook(row):\n    if row.get('explode'):\n        raise RuntimeError('boom')\n    return {}\n"


def write_source(tmp_path, rule):
    good, bad, at = CASES[rule]
    lines = [json.dumps(row) for row in good]
    lines.insert(at, bad if isinstance(bad, str) else json.dumps(bad))
    path = tmp_path / f"{rule}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "pic.png")
    return path, at, len(good)


def params_for(tmp_path, rule, policy):
    path, at, good = write_source(tmp_path, rule)
    data = {"train": str(path), "on_invalid": policy, "eval_fraction": 0.2}
    if rule == "preprocess_failed":
        (tmp_path / "hook.py").write_text(HOOK)
        data["preprocess"] = f"{tmp_path / 'hook.py'}:hook"
    return check_params({"data": data}), path, at, good


def test_every_normalize_rule_is_covered():
    assert set(CASES) | {
        "preprocess_skipped",
        "template_error",
        "template_changes_prompt",
        "emptied_by_truncation",
        "image_truncated",
    } == set(RULES)  # the tokenize rules elsewhere


@pytest.mark.parametrize("rule", sorted(CASES))
def test_error_policy_names_file_row_and_rule_and_writes_nothing(tmp_path, rule):
    params, path, at, _ = params_for(tmp_path, rule, "error")
    out = tmp_path / "normalized"
    with pytest.raises(PipelineError) as err:
        normalize_stage.run(params, out)
    message = str(err.value)
    assert message.startswith(f"{path}: row {at}: ") and f"[rule {rule}]" in message, message
    assert "data.on_invalid: drop" in message
    assert not out.exists() and not list(tmp_path.glob("normalized*"))


@pytest.mark.parametrize("rule", sorted(CASES))
def test_drop_policy_writes_the_rest_and_lists_the_dropped_row(tmp_path, rule):
    params, path, at, good = params_for(tmp_path, rule, "drop")
    out = tmp_path / "normalized"
    report = normalize_stage.run(params, out)
    assert report["rows_read"] == good + 1
    assert sum(report["rows_written"].values()) == good and report["rows_dropped"] == 1
    assert report["rows_read"] == sum(report["rows_written"].values()) + report["rows_dropped"]
    assert report["dropped_by_reason"] == {rule: 1}
    assert json.loads((out / "report.json").read_text())["dropped_by_reason"] == {rule: 1}
    [entry] = [json.loads(line) for line in (out / report["dropped_rows_file"]).read_text().splitlines()]
    assert (entry["source"], entry["row"], entry["rule"]) == (str(path), at, rule) and entry["detail"]
    written = [
        decoded_row(r) for split in ("train", "eval") for r in pq.read_table(out / f"{split}.parquet").to_pylist()
    ]
    if rule == "malformed_row":
        assert entry["row_id"] is None  # nothing parsed to name it by
    elif rule == "duplicate_pair":
        assert entry["row_id"] in {r["row_id"] for r in written}  # the same pair as the kept first copy
    else:
        assert entry["row_id"].startswith("raw:") and entry["row_id"] not in {r["row_id"] for r in written}
    assert len({r["row_id"] for r in written}) == good


def test_a_dataset_with_no_valid_row_left_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " a"}) + "\n" for _ in range(3)))
    with pytest.raises(PipelineError, match=r"no valid training rows remain \(3 read, 3 dropped"):
        normalize_stage.run(check_params({"data": {"train": str(path), "on_invalid": "drop"}}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_csv_rows_with_extra_fields_are_malformed(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nQ1, a, b\nQ2, a, b, c\nQ3, c, d\n")
    with pytest.raises(PipelineError, match=r"pairs.csv: row 1: CSV line 3 has more fields.*malformed_row"):
        normalize_stage.run(check_params({"data": {"train": str(path)}}), tmp_path / "out")
    report = normalize_stage.run(check_params({"data": {"train": str(path), "on_invalid": "drop"}}), tmp_path / "out")
    assert report["dropped_by_reason"] == {"malformed_row": 1} and sum(report["rows_written"].values()) == 2


def test_every_rule_is_documented_in_the_data_page():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    table = page.split("| rule | the row… |", 1)[1].split("\n\n", 1)[0]  # the invalid-row rule table
    assert [rule for rule in RULES if f"`{rule}`" not in table] == []
