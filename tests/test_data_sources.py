"""Every source kind the normalize stage reads, the preprocessing hook, the column mapping, and the
eval split (its own source, or carved from train with a seeded eval_fraction)."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.data.sources as sources
import stages.normalize as normalize_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.data.schema import decoded_row

STANDARD = [
    {"prompt": f"Question {i}:", "chosen": f" good answer {i}.", "rejected": f" bad answer {i}."} for i in range(6)
]
TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 2+3?"}],
        "chosen": [
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
            },
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ],
        "rejected": [{"role": "assistant", "content": "It is 6."}],
        "tools": [TOOL],
        "chat_template_kwargs": None,
    },
    {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
        "tools": None,
        "chat_template_kwargs": {"enable_thinking": False},
    },
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def normalize(tmp_path, out_name="normalized", **data) -> tuple[dict, list[dict]]:
    params = check_params({"data": {"eval_fraction": 0.3, **data}})
    out = tmp_path / out_name
    report = normalize_stage.run(params, out)
    rows = [decoded_row(r) for split in ("train", "eval") for r in pq.read_table(out / f"{split}.parquet").to_pylist()]
    return report, rows


def triples(rows: list[dict]) -> Counter:
    keep = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
    return Counter(json.dumps({k: r.get(k) for k in keep}, sort_keys=True) for r in rows)


def write_jsonl(path, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_json_array(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    "filename, writer",
    [
        ("pairs.jsonl", write_jsonl),
        ("pairs.jsonl.gz", write_jsonl),
        ("pairs.json", write_json_array),
        ("lines.json", write_jsonl),
        ("pairs.parquet", write_parquet),
        ("pairs.csv", write_csv),
    ],
)
def test_local_files_of_every_type_give_the_same_rows(tmp_path, filename, writer):
    source = writer(tmp_path / filename, STANDARD)
    report, rows = normalize(tmp_path, train=str(source))
    assert triples(rows) == triples([dict(r, tools=None, chat_template_kwargs=None) for r in STANDARD])
    assert report["rows_read"] == 6 and report["rows_dropped"] == 0 and report["formats"]["train"] == "standard"
    assert sum(report["rows_written"].values()) == 6


def test_a_json_array_is_parsed_incrementally_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_CHUNK", 7)  # every item spans several reads
    path = write_json_array(tmp_path / "pairs.json", CONVERSATIONAL + STANDARD[:1])
    got = [row for _, _, row in sources.iter_rows(str(path))]
    assert got == json.loads(path.read_text())
    truncated = tmp_path / "cut.json"
    truncated.write_text(path.read_text()[:-40])
    with pytest.raises(PipelineError, match=r"cut.json: row 2: invalid JSON .*malformed_row"):
        list(sources.iter_rows(str(truncated)))


@pytest.mark.parametrize("writer", ["jsonl", "parquet", "save_to_disk"])
def test_conversational_rows_with_tool_calls_survive_exactly(tmp_path, writer):
    """Arrow sources pad every message with the keys of all others (as nulls); none of that leaks."""
    if writer == "jsonl":
        source = write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONAL)
    elif writer == "parquet":
        source = write_parquet(tmp_path / "conv.parquet", CONVERSATIONAL)
    else:
        source = tmp_path / "saved"
        datasets.Dataset.from_list(CONVERSATIONAL).save_to_disk(str(source))
    report, rows = normalize(tmp_path, train=str(source))
    assert report["formats"] in ({"train": "conversational"}, {"train": "conversational", "eval": "conversational"})
    expected = [dict(row, chat_template_kwargs=row.get("chat_template_kwargs")) for row in CONVERSATIONAL]
    assert triples(rows) == triples(expected)
    by_prompt = {json.dumps(r["prompt"]): r for r in rows}
    tool_row = by_prompt[json.dumps(CONVERSATIONAL[0]["prompt"])]
    assert tool_row["chosen"] == CONVERSATIONAL[0]["chosen"]  # order of turns and keys as written
    assert list(tool_row["chosen"][0]) == ["role", "tool_calls"]


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(STANDARD[:4]), "test": datasets.Dataset.from_list(STANDARD[4:])}
    ).save_to_disk(str(saved))
    _, rows = normalize(tmp_path, train=str(saved), split="test", eval=str(saved), eval_split="train")
    assert triples(rows) == triples([dict(r, tools=None, chat_template_kwargs=None) for r in STANDARD])
    report = json.loads((tmp_path / "normalized" / "report.json").read_text())
    assert report["rows_written"] == {"train": 2, "eval": 4}
    with pytest.raises(PipelineError, match=r"no split 'validation'"):
        normalize(tmp_path, "n2", train=str(saved), split="validation")


def hub_like_repo(tmp_path):
    """A local directory laid out like a Hub dataset repository: two configs, two splits each."""
    repo = tmp_path / "org--prefs"
    for config in ("pairs", "other"):
        (repo / config).mkdir(parents=True)
        offset = 0 if config == "pairs" else 3
        write_jsonl(repo / config / "train.jsonl", STANDARD[offset : offset + 2])
        write_jsonl(repo / config / "test.jsonl", STANDARD[offset + 2 : offset + 3])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: pairs\n  data_files:\n  - split: train\n    path: pairs/train.jsonl\n"
        "  - split: test\n    path: pairs/test.jsonl\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/train.jsonl\n"
        "  - split: test\n    path: other/test.jsonl\n---\n"
    )
    return repo


def test_hub_dataset_with_name_split_and_revision_goes_through_load_dataset(tmp_path, monkeypatch):
    repo = hub_like_repo(tmp_path)
    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)  # (a local repository ignores the revision; the Hub resolves it)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    report, rows = normalize(
        tmp_path, train=str(repo), name="other", split="test", revision="v1.0", eval=str(repo), eval_split="train"
    )
    assert calls == [
        ((str(repo), "other"), {"split": "test", "revision": "v1.0"}),
        ((str(repo), "other"), {"split": "train", "revision": "v1.0"}),
    ]
    assert report["rows_written"] == {"train": 1, "eval": 2}
    assert triples(rows) == triples([dict(r, tools=None, chat_template_kwargs=None) for r in STANDARD[3:6]])


def test_an_unreachable_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=r"no-such-org/no-such-dataset: could not load the dataset"):
        normalize(tmp_path, train="no-such-org/no-such-dataset")


def test_a_glob_reads_every_matching_file_and_errors_name_the_file(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", STANDARD[:3])
    write_jsonl(tmp_path / "part-1.jsonl", STANDARD[3:] + [{"prompt": "Q", "chosen": None, "rejected": " b"}])
    with pytest.raises(PipelineError, match=r"part-1.jsonl: row 3: 'chosen' is null \[rule null_field\]"):
        normalize(tmp_path, train=str(tmp_path / "part-*.jsonl"))
    report, rows = normalize(tmp_path, train=str(tmp_path / "part-*.jsonl"), on_invalid="drop")
    assert len(rows) == 6 and report["rows_read"] == 7


CODE_PAIRS = [
    {
        "ID": i,
        "instruction": "",
        "input": f"Write function number {i}.",
        "accepted": f"def f{i}(): return {i}",
        "rejected": f"def f{i}(): return -{i}",
    }
    for i in range(4)
]
HOOK = """
def preprocess_function(example):
    return {
        "prompt": [{"role": "user", "content": example["input"]}],
        "chosen": [{"role": "assistant", "content": example["accepted"]}],
        "rejected": [{"role": "assistant", "content": example["rejected"]}],
    }
"""


@pytest.mark.parametrize("form", ["file", "module"])
def test_the_reference_code_preference_pairs_example_as_a_hook(tmp_path, monkeypatch, form):
    (tmp_path / "code_pairs_hook.py").write_text(HOOK)
    source = write_jsonl(tmp_path / "code.jsonl", CODE_PAIRS)
    if form == "module":
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = "code_pairs_hook:preprocess_function"
    else:
        spec = f"{tmp_path / 'code_pairs_hook.py'}:preprocess_function"
    report, rows = normalize(tmp_path, train=str(source), preprocess=spec)
    assert report["formats"]["train"] == "conversational" and len(rows) == 4
    assert triples(rows) == triples(
        [
            {
                "prompt": [{"role": "user", "content": r["input"]}],
                "chosen": [{"role": "assistant", "content": r["accepted"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
                "tools": None,
                "chat_template_kwargs": None,
            }
            for r in CODE_PAIRS
        ]
    )
    manifest = json.loads((tmp_path / "normalized" / "manifest.json").read_text())
    assert "preprocess" in manifest["inputs"]  # the hook's digest: editing it changes the artifact's identity


def test_a_hook_can_skip_rows_and_its_errors_follow_the_policy(tmp_path):
    (tmp_path / "hooks.py").write_text(
        "def keep_even(row):\n"
        "    if row['ID'] % 2:\n        return None\n"
        "    if row['ID'] == 2:\n        raise KeyError('accepted')\n"
        "    return {'prompt': row['input'], 'chosen': ' ' + row['accepted'], 'rejected': ' ' + row['rejected']}\n"
    )
    source = write_jsonl(tmp_path / "code.jsonl", CODE_PAIRS)
    spec = f"{tmp_path / 'hooks.py'}:keep_even"
    with pytest.raises(
        PipelineError, match=r"code.jsonl: row 2: the data.preprocess hook raised KeyError.*preprocess_failed"
    ):
        normalize(tmp_path, train=str(source), preprocess=spec)
    report, rows = normalize(tmp_path, train=str(source), preprocess=spec, on_invalid="drop")
    assert len(rows) == 1 and report["dropped_by_reason"] == {"preprocess_failed": 1, "preprocess_skipped": 2}
    for bad in ("nope", f"{tmp_path / 'hooks.py'}:missing", "no_such_module_xyz:f"):
        with pytest.raises(PipelineError, match="data.preprocess"):
            normalize(tmp_path, train=str(source), preprocess=bad)


def test_column_mapping_renames_source_columns(tmp_path):
    renamed = [
        {"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"], "extra": 1} for r in STANDARD
    ]
    source = write_parquet(tmp_path / "se.parquet", renamed)
    mapping = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    _, rows = normalize(tmp_path, train=str(source), columns=mapping)
    assert triples(rows) == triples([dict(r, tools=None, chat_template_kwargs=None) for r in STANDARD])
    with pytest.raises(PipelineError, match=r"no 'answer_a' column, which data.columns maps.*missing_column"):
        normalize(tmp_path, train=str(source), columns={**mapping, "chosen": "answer_a"})
    with pytest.raises(PipelineError, match=r"data.columns maps 'good'"):
        normalize(tmp_path, train=str(source), columns={"good": "response_j"})


def test_eval_from_its_own_source(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", STANDARD[:4])
    held_out = write_jsonl(tmp_path / "eval.jsonl", STANDARD[4:] + STANDARD[:1])  # one pair leaks from train
    report, _ = normalize(tmp_path, train=str(train), eval=str(held_out), on_invalid="drop")
    assert report["rows_written"] == {"train": 4, "eval": 2}
    assert report["dropped_by_reason"] == {"duplicate_pair": 1}  # an eval pair seen in train is never evaluated


def test_carved_eval_is_seeded_and_keeps_each_prompt_on_one_side(tmp_path):
    rows = [{"prompt": f"Prompt {i // 3}:", "chosen": f" yes {i}.", "rejected": f" no {i}."} for i in range(300)]
    source = write_jsonl(tmp_path / "many.jsonl", rows)
    splits = {}
    for seed in (0, 0, 1):
        params = check_params({"seed": seed, "data": {"train": str(source), "eval_fraction": 0.2}})
        out = tmp_path / f"n{len(splits)}-{seed}"
        normalize_stage.run(params, out)
        prompts = {
            split: [r["prompt"] for r in pq.read_table(out / f"{split}.parquet").to_pylist()]
            for split in ("train", "eval")
        }
        assert not set(prompts["train"]) & set(prompts["eval"])  # a prompt's pairs all land on one side
        assert 0.1 < len(prompts["eval"]) / 300 < 0.3
        splits.setdefault(seed, []).append(prompts)
    assert splits[0][0] == splits[0][1]  # same seed, same split
    assert splits[0][0]["eval"] != splits[1][0]["eval"]
