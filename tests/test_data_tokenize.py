"""Tokenization: chat templates with tools and per-row kwargs, the prompt-boundary policy on a
byte-level BPE tokenizer trained here, BOS/EOS, truncation, template rules under both policies,
and streaming over record batches and worker processes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import pipeline.data.normalize as normalize_module
import stages.normalize as normalize_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.schema import decoded_row
from pipeline.data.tokenize import tokenize_dataset, truncate_pair
from pipeline.store.artifacts import stage_output

SPECIAL = ["<s>", "<|end|>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>tools: {{ tools | tojson }}<|end|>{% endif %}"
    "{% if effort is defined %}<|system|>effort: {{ effort }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.content %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }}({{ c.function.arguments | tojson }})"
    "</call>{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The sky is blue. The sky is green. The sea is blue and the grass is green.",
    "What is 2+3? It is 5. Call add with a and b. The weather in Paris is sunny, 21 degrees.",
]


def bpe_tokenizer(template: str = TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a tiny corpus, adding BOS like Llama's, with a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        CORPUS * 50,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def run_stages(tmp_path, rows, tokenizer, data=None, tokenize=None, name="t"):
    """normalize (the stage) then tokenize (the library call the stage makes), into tmp_path/name-*."""
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = check_params(
        {"data": {"train": str(source), "eval_fraction": 0.01, **(data or {})}, "tokenize": tokenize or {}}
    )
    normalized = tmp_path / f"{name}-normalized"
    normalize_stage.run(params, normalized)
    out = tmp_path / f"{name}-tokenized"
    with stage_output("tokenize", out, {"normalized": normalized}, params["tokenize"]) as output:
        report = tokenize_dataset(tokenizer, normalized, output.dir, params)
    pairs = {r["row_id"]: r for split in ("train", "eval") for r in pq.read_table(out / f"{split}.parquet").to_pylist()}
    canonical = {
        r["row_id"]: decoded_row(r)
        for split in ("train", "eval")
        for r in pq.read_table(normalized / f"{split}.parquet").to_pylist()
    }
    return report, pairs, canonical, out


def full_ids(tokenizer, row, completion):
    text = tokenizer.apply_chat_template(
        row["prompt"] + row[completion],
        tools=row.get("tools"),
        tokenize=False,
        **(row.get("chat_template_kwargs") or {}),
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TOOL_ROWS = [
    {
        "prompt": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 2+3?"}],
        "chosen": [
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
            },
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ],
        "rejected": [{"role": "assistant", "content": "It is 6."}],
        "tools": [ADD],
    },
    {
        "prompt": [
            {"role": "user", "content": "The weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "name": "weather", "content": "sunny, 21 degrees"},
        ],
        "chosen": [{"role": "assistant", "content": "It is sunny, 21 degrees."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
        "tools": json.dumps([ADD, WEATHER]),
    },
    {
        "prompt": [{"role": "user", "content": "The sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
        "chat_template_kwargs": {"effort": "high"},
    },
]


def test_tool_calling_rows_round_trip_through_normalize_and_tokenize(tmp_path, tokenizer):
    report, pairs, canonical, _ = run_stages(tmp_path, TOOL_ROWS, tokenizer)
    assert len(pairs) == 3 and report["train"]["boundary_merges"] + report["eval"]["boundary_merges"] == 0
    expected = [
        dict(
            r,
            tools=json.loads(r["tools"]) if isinstance(r.get("tools"), str) else r.get("tools"),
            chat_template_kwargs=r.get("chat_template_kwargs"),
        )
        for r in TOOL_ROWS
    ]
    keys = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
    assert sorted(json.dumps({k: row[k] for k in keys}) for row in canonical.values()) == sorted(
        json.dumps({k: row[k] for k in keys}) for row in expected
    )  # nothing lost, nothing reordered
    for row_id, row in canonical.items():
        ids = pairs[row_id]
        for completion in ("chosen", "rejected"):  # prompt + completion is exactly the templated conversation
            assert ids["prompt_ids"] + ids[f"{completion}_ids"] == full_ids(tokenizer, row, completion)
        prompt_text = tokenizer.decode(ids["prompt_ids"])
        assert prompt_text.endswith("<|assistant|>") and prompt_text.count("<s>") == 1
        if row["tools"]:
            assert "tools: " in prompt_text and all(t["function"]["name"] in prompt_text for t in row["tools"])
        assert ("effort: high" in prompt_text) == (row["chat_template_kwargs"] is not None)  # per row
    tool_call_row = next(r for r in canonical.values() if r["chosen"][0].get("tool_calls"))
    chosen_text = tokenizer.decode(pairs[tool_call_row["row_id"]]["chosen_ids"])
    assert chosen_text == '<call>add({"a": 2, "b": 3})</call><|end|><|tool|>5<|end|><|assistant|>It is 5.<|end|>'


def test_a_bpe_merge_across_the_prompt_boundary_moves_the_token_into_both_completions(tmp_path, tokenizer):
    # "is " + "blue." tokenizes as "is", " blue", "." whole, but as "is", " " + "blue", "." apart
    merged = {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}
    clean = {"prompt": "The sea is", "chosen": " blue.", "rejected": " green."}
    apart = (
        tokenizer(merged["prompt"])["input_ids"] + tokenizer(merged["chosen"], add_special_tokens=False)["input_ids"]
    )
    whole = tokenizer(merged["prompt"] + merged["chosen"])["input_ids"]
    assert apart != whole  # the case is real for this tokenizer
    report, pairs, canonical, _ = run_stages(tmp_path, [merged, clean], tokenizer, data={"eval_fraction": 0.01})
    split = report["train"]
    assert split["boundary_merges"] == 1 and split["boundary_tokens_moved"] == 1
    eos = tokenizer.eos_token_id
    by_prompt = {canonical[row_id]["prompt"]: ids for row_id, ids in pairs.items()}
    ids = by_prompt[merged["prompt"]]
    for completion in ("chosen", "rejected"):
        text = merged["prompt"] + merged[completion]
        assert ids["prompt_ids"] + ids[f"{completion}_ids"] == tokenizer(text)["input_ids"] + [eos]
        assert tokenizer.decode(ids[f"{completion}_ids"]) == " " + merged[completion] + "<|end|>"
    assert tokenizer.decode(ids["prompt_ids"]) == "<s>The sky is"
    ids = by_prompt[clean["prompt"]]
    assert ids["prompt_ids"] == tokenizer(clean["prompt"])["input_ids"]  # no merge: the prompt as tokenized alone
    assert tokenizer.decode(ids["chosen_ids"]) == " blue.<|end|>"


def test_no_doubled_bos_or_eos(tmp_path, tokenizer):
    rows = [{"prompt": "<s>The sky is", "chosen": " blue.<|end|>", "rejected": " green."}]
    _, pairs, _, _ = run_stages(tmp_path, rows, tokenizer)
    [ids] = pairs.values()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids["prompt_ids"][0] == bos and ids["prompt_ids"].count(bos) == 1
    assert ids["chosen_ids"][-1] == eos and ids["chosen_ids"].count(eos) == 1
    assert ids["rejected_ids"][-1] == eos and ids["rejected_ids"].count(eos) == 1


CHANGES_EARLIER_TURNS = TEMPLATE.replace("<|{{ m.role }}|>", "<|{{ m.role }}|>{% if loop.last %}(last) {% endif %}")
RAISES = TEMPLATE.replace(
    "{% for m in messages %}",
    "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no booms') }}{% endif %}",
)


@pytest.mark.parametrize(
    "template, rule", [(CHANGES_EARLIER_TURNS, "template_changes_prompt"), (RAISES, "template_error")]
)
def test_template_rules_under_both_policies(tmp_path, template, rule):
    tokenizer = bpe_tokenizer(template)
    ok = TOOL_ROWS[2]
    bad = {
        "prompt": [{"role": "user", "content": "boom"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    rows = [ok, bad] if rule == "template_error" else [ok]
    with pytest.raises(PipelineError) as err:
        run_stages(tmp_path, rows, tokenizer, name="strict")
    message = str(err.value)
    assert "strict-normalized/train.parquet: row " in message and "(row_id " in message and f"[rule {rule}]" in message
    assert not (tmp_path / "strict-tokenized").exists() and not list(tmp_path.glob("strict-tokenized*"))
    report, pairs, canonical, out = run_stages(tmp_path, rows, tokenizer, data={"on_invalid": "drop"}, name="lenient")
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    bad_ids = {
        row_id
        for row_id, row in canonical.items()
        if rule == "template_changes_prompt" or row["prompt"] == bad["prompt"]
    }
    assert {d["row_id"] for d in dropped} == bad_ids and {d["rule"] for d in dropped} == {rule}
    assert set(pairs) == set(canonical) - bad_ids
    for split in report.values():
        assert split["rows_read"] == split["rows_written"] + split["rows_dropped"]


def test_truncation_of_pairs():
    ids = {"prompt_ids": [0, 1, 2, 3, 4], "chosen_ids": [10, 11, 12], "rejected_ids": [20]}
    assert truncate_pair(ids, 8, "keep_start") == ids
    assert truncate_pair(ids, 7, "keep_start") == {
        "prompt_ids": [0, 1, 2, 3, 4],
        "chosen_ids": [10, 11],
        "rejected_ids": [20],
    }
    assert truncate_pair(ids, 4, "keep_start") == {"prompt_ids": [0, 1, 2, 3], "chosen_ids": [], "rejected_ids": []}
    # keep_end drops the oldest prompt tokens, after the BOS (id 0 here), until the longer side fits
    assert truncate_pair(ids, 6, "keep_end", bos_id=0) == {
        "prompt_ids": [0, 3, 4],
        "chosen_ids": [10, 11, 12],
        "rejected_ids": [20],
    }
    assert truncate_pair(ids, 6, "keep_end") == {
        "prompt_ids": [2, 3, 4],
        "chosen_ids": [10, 11, 12],
        "rejected_ids": [20],
    }
    # a completion too long on its own keeps one prompt token and loses its end
    assert truncate_pair(ids, 3, "keep_end", bos_id=0) == {
        "prompt_ids": [0, 4],
        "chosen_ids": [10],
        "rejected_ids": [20],
    }


def test_truncation_report_and_keep_end_warning(tmp_path, tokenizer):
    rows = [
        {"prompt": "The sky is", "chosen": " blue. " * 6, "rejected": " green."},  # chosen cut
        {
            "prompt": "The sea is blue and the grass is green. " * 4 + "The sky is",
            "chosen": " blue.",
            "rejected": " green.",
        },  # prompt fills max_length
        {"prompt": "The sea is", "chosen": " blue.", "rejected": " green."},
    ]  # fits
    report, pairs, canonical, out = run_stages(tmp_path, rows, tokenizer, tokenize={"max_length": 12})
    split = report["train"]
    assert split["rows_read"] == 3 and split["rows_written"] == 2
    assert split["dropped_by_reason"] == {"emptied_by_truncation": 1}  # dropped even under on_invalid: error
    assert split["rows_truncated"] == 2 and split["prompts_truncated"] == 1
    assert split["chosen_truncated"] == 2 and split["rejected_truncated"] == 1  # emptied counts as truncated
    assert split["completions_truncated"] == 3 and split["completions_emptied"] == 2
    assert split["lengths"]["total"]["max"] <= 12
    for ids in pairs.values():
        assert len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) <= 12
    with pytest.warns(FutureWarning, match="keep_end"):
        report, pairs, canonical, _ = run_stages(
            tmp_path, rows, tokenizer, name="end", tokenize={"max_length": 12, "truncation_mode": "keep_end"}
        )
    split = report["train"]
    assert split["rows_written"] == 3 and split["prompts_truncated"] == 2 and split["completions_emptied"] == 0
    long_prompt = next(
        ids for row_id, ids in pairs.items() if canonical[row_id]["prompt"].startswith("The sea is blue")
    )
    assert tokenizer.decode(long_prompt["prompt_ids"]).startswith("<s>") and tokenizer.decode(
        long_prompt["prompt_ids"]
    ).endswith("The sky is")  # its start went, its end stayed


def test_streaming_in_small_batches_and_worker_processes_gives_the_same_output(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(normalize_module, "CHUNK_ROWS", 8)  # several Parquet row groups
    rows = [
        {
            "prompt": f"The sky is {'blue' if i % 2 else 'green'} {i}",
            "chosen": f" and the sea is blue {i}.",
            "rejected": f" and the sea is green {i}.",
        }
        for i in range(50)
    ]
    # one boundary merge ("7 " + "and" → "7", " and"), to be counted either way
    rows[7] = {key: rows[7][key] + " " if key == "prompt" else rows[7][key].lstrip() for key in rows[7]}
    runs = {}
    for num_proc in (None, 2):
        report, pairs, _, out = run_stages(
            tmp_path,
            rows,
            tokenizer,
            name=f"p{num_proc}",
            data={"eval_fraction": 0.2},
            tokenize={"batch_size": 6, "dataset_num_proc": num_proc},
        )
        runs[num_proc] = (report, {split: pq.read_table(out / f"{split}.parquet") for split in ("train", "eval")})
    assert pq.ParquetFile(tmp_path / "pNone-normalized" / "train.parquet").num_row_groups > 3
    (serial_report, serial), (parallel_report, parallel) = runs[None], runs[2]
    assert serial_report == parallel_report
    assert all(serial[split].equals(parallel[split]) for split in serial)  # same rows, same order
    assert sum(r["boundary_merges"] for r in serial_report.values()) == 1
    assert sum(r["rows_written"] for r in serial_report.values()) == 50
    with pytest.raises(PipelineError, match="dataset_num_proc"):
        run_stages(tmp_path, rows, tokenizer, name="bad", tokenize={"dataset_num_proc": 0})


def test_in_process_preparation_matches_the_stages(tmp_path, tokenizer):
    import datasets

    rows = [
        dict(
            r,
            tools=json.dumps(r["tools"]) if isinstance(r.get("tools"), list) else r.get("tools"),
            chat_template_kwargs=json.dumps(r.get("chat_template_kwargs")),
        )
        for r in TOOL_ROWS
    ]
    _, pairs, _, _ = run_stages(tmp_path, TOOL_ROWS, tokenizer)
    prepared = prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, 1024, "keep_start")
    assert {r["row_id"]: {k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in prepared} == {
        row_id: {k: ids[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row_id, ids in pairs.items()
    }
    bad = datasets.Dataset.from_list([{"prompt": "Q", "chosen": " a", "rejected": " a"}])
    with pytest.raises(PipelineError, match=r"train_dataset: row 0: .*\[rule identical_pair\]"):
        prepare_dataset(bad, tokenizer, 1024, "keep_start")


@pytest.mark.parametrize(
    "explicit, implicit",
    [
        (
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        ),
        (
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The sky?"}],
                "chosen": [{"role": "assistant", "content": "It is blue."}],
                "rejected": [{"role": "assistant", "content": "It is green."}],
            },
            {
                "chosen": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "The sky?"},
                    {"role": "assistant", "content": "It is blue."},
                ],
                "rejected": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "The sky?"},
                    {"role": "assistant", "content": "It is green."},
                ],
            },
        ),
    ],
)
def test_explicit_and_implicit_prompts_tokenize_identically_in_each_format(tmp_path, tokenizer, explicit, implicit):
    _, first, _, _ = run_stages(tmp_path, [explicit], tokenizer, name="explicit")
    _, second, _, _ = run_stages(tmp_path, [implicit], tokenizer, name="implicit")
    assert first == second and len(first) == 1  # same row_id, same ids
    # in one dataset, the second spelling of the same pair is a duplicate
    report, pairs, _, _ = run_stages(
        tmp_path, [explicit, implicit], tokenizer, name="both", data={"on_invalid": "drop"}
    )
    assert pairs == first
    normalized = json.loads((tmp_path / "both-normalized" / "report.json").read_text())
    assert normalized["dropped_by_reason"] == {"duplicate_pair": 1} and normalized["implicit_prompts"] == 0


HH = Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base-test-1200.jsonl.gz"  # MIT, see its README


def test_a_tokenizer_that_does_not_cover_the_data_is_refused(tmp_path, tiny_tokenizer):
    """The built-in word-level tokenizer on real HH-RLHF text: most tokens are <unk>, so tokenize stops."""
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(300))]
    data = {"prompt_marker": "\n\nAssistant:", "on_invalid": "drop"}
    with pytest.raises(
        PipelineError,
        match=r"train\.parquet: .*% of the tokens .* unknown token '<unk>', above "
        r"tokenize\.max_unknown_rate \(0\.05\)\. Use a tokenizer that covers",
    ):
        run_stages(tmp_path, rows, tiny_tokenizer, data=data, name="hh")
    report, *_ = run_stages(tmp_path, rows, tiny_tokenizer, data=data, tokenize={"max_unknown_rate": 1.0}, name="hh1")
    unknown = report["train"]["unknown_tokens"]
    assert unknown["token"] == "<unk>" and unknown["rate"] > 0.5 and unknown["count"] < unknown["of"]
    assert report["eval"]["unknown_tokens"]["of"] > 0


def test_a_tokenizer_without_an_unknown_token_reports_none(tmp_path, tokenizer):
    rows = [{"prompt": "The sky is" + " " * i, "chosen": " blue.", "rejected": " green."} for i in range(40)]
    report, *_ = run_stages(tmp_path, rows, tokenizer, name="bpe")
    assert report["train"]["unknown_tokens"] is None  # a byte-level BPE has no unknown token
