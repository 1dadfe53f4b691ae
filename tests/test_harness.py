"""The lm-evaluation-harness regression check (`pipeline.judge.harness`), through the harness itself: the built-in
tiny model, untrained (standing for the policy) and differently seeded (the reference), on a small local task in the
built-in vocabulary (tests/data/lm_eval/tiny_sentiment.yaml); figures in [0, 1] with a standard error, lined up side
by side; unknown task names and a missing include_path refused, naming the key, before anything runs. Offline."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from pipeline.builtin.model import build_model  # noqa: E402
from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.judge import harness  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
TASK = "tiny_sentiment"


@pytest.fixture(scope="module")
def include_path(tmp_path_factory) -> str:
    """The task YAML copied into a temporary include_path with its JSONL made absolute (`datasets` resolves a
    relative data file against the working directory) and the datasets cache kept in the temporary folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = yaml.safe_load((DATA / f"{TASK}.yaml").read_text())
    data = root / f"{TASK}.jsonl"
    shutil.copyfile(DATA / f"{TASK}.jsonl", data)
    config["dataset_kwargs"] = {"data_files": {"test": str(data)}, "cache_dir": str(root / "datasets_cache")}
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(tasks)


@pytest.fixture(scope="module")
def figures(include_path, tiny_tokenizer):
    """The harness's figures of the policy (seed 0, left in train mode to see it given back so) and the reference
    (seed 1), under the same settings."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        out = {}
        for name, seed in (("policy", 0), ("reference", 1)):
            model = build_model(tiny_tokenizer, seed=seed, hidden_size=32, num_layers=1, num_heads=2)
            model.train(name == "policy")
            out[name] = harness.run_harness(
                model, tiny_tokenizer, [TASK], include_path, limit=12, num_fewshot=1, batch_size=4, seed=0
            )
            assert model.training == (name == "policy")
    return out


def test_figures_are_fractions_with_a_standard_error(figures):
    for name in ("policy", "reference"):
        row = figures[name][TASK]
        assert set(row) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}, row
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= row[metric] <= 1.0
            assert row[metric + "_stderr"] is not None and row[metric + "_stderr"] >= 0.0
        json.dumps(figures[name], allow_nan=False)


def test_side_by_side_lines_the_two_models_up(figures):
    rows = harness.side_by_side(figures["policy"], figures["reference"])
    assert [(r["task"], r["metric"]) for r in rows] == [(TASK, "acc"), (TASK, "acc_norm")]
    for row in rows:
        policy, reference = figures["policy"][TASK], figures["reference"][TASK]
        assert row["policy"] == policy[row["metric"]] and row["reference"] == reference[row["metric"]]
        assert row["policy_stderr"] == policy[row["metric"] + "_stderr"]
        assert row["reference_stderr"] == reference[row["metric"] + "_stderr"]
        assert row["difference"] == pytest.approx(row["policy"] - row["reference"])
    only_reference = harness.side_by_side({}, {"t": {"acc": 0.5, "acc_stderr": None}})
    assert only_reference == [
        {
            "task": "t",
            "metric": "acc",
            "policy": None,
            "policy_stderr": None,
            "reference": 0.5,
            "reference_stderr": None,
            "difference": None,
        }
    ]


def test_flat_results_strip_the_default_filter_and_keep_others():
    raw = {
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.05,
            "exact_match,none": 0.5,
            "exact_match_stderr,none": "N/A",
        }
    }
    assert harness.flat_results(raw) == {
        "gsm8k": {
            "exact_match/strict-match": 0.25,
            "exact_match/strict-match_stderr": 0.05,
            "exact_match": 0.5,
            "exact_match_stderr": None,
        }
    }


def test_unknown_task_names_are_refused_before_anything_runs(include_path, tiny_tokenizer, monkeypatch):
    from lm_eval.models import huggingface

    def must_not_run(*args, **kwargs):
        raise AssertionError("the harness ran before the task names were checked")

    monkeypatch.setattr(huggingface, "HFLM", must_not_run)
    monkeypatch.setattr(lm_eval, "simple_evaluate", must_not_run)
    with pytest.raises(PipelineError) as refused:
        harness.run_harness(
            None, tiny_tokenizer, [TASK, "tiny_sentimnt", "hellaswg"], include_path, None, None, 4, seed=0
        )
    message = str(refused.value)
    assert "evaluate.lm_eval.tasks" in message
    assert "'tiny_sentimnt'" in message and "'hellaswg'" in message and f"'{TASK}' (" not in message
    assert f"did you mean '{TASK}'" in message and "'hellaswag'" in message  # close matches: own and built-in


def test_a_missing_include_path_is_refused(tmp_path):
    with pytest.raises(PipelineError, match=r"evaluate\.lm_eval\.include_path: .* does not exist"):
        harness.check_tasks([TASK], str(tmp_path / "no-such-folder"))
    (tmp_path / "a-file.yaml").write_text("task: x\n")
    with pytest.raises(PipelineError, match=r"evaluate\.lm_eval\.include_path: .* is not a directory"):
        harness.check_tasks([TASK], str(tmp_path / "a-file.yaml"))
    harness.check_tasks([], str(tmp_path / "no-such-folder"))  # no tasks: the check is off, nothing to refuse


def test_a_missing_harness_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(PipelineError) as refused:
        harness.require_harness()
    message = str(refused.value)
    assert "evaluate.lm_eval.tasks" in message and "pip install -e '.[eval]'" in message
    assert "pip install lm_eval" in message
