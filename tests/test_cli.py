"""The `dpo` command: every stage is a subcommand, and user mistakes are one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main

STAGES = (
    "base",
    "normalize",
    "tokenize",
    "ref-logps",
    "train",
    "evaluate",
    "export",
    "generate",
    "judge-pairs",
    "progress",
)


def test_every_stage_has_a_help_page():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for stage in STAGES:
        assert stage in top.output
        result = runner.invoke(main, [stage, "--help"])
        assert result.exit_code == 0 and "--params" in result.output, stage


def write_params(path, data_file, **data):
    path.write_text(yaml.safe_dump({"data": {"train": str(data_file), **data}}))


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ({"prompt": "Hi", "chosen": "Hello"}, r"'rejected' is null"),  # a key absent in one JSON row reads as null
        ({"prompt": "Hi", "chosen": None, "rejected": "No"}, r"'chosen' is null"),
        ({"prompt": "Hi", "chosen": "  ", "rejected": "No"}, r"chosen is empty"),
        ({"chosen": "Alpha one", "rejected": "Beta two"}, r"prompt cannot be extracted"),
    ],
)
def test_bad_normalize_input_names_file_row_and_problem_and_writes_nothing(tmp_path, bad_row, problem):
    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    data.write_text("\n".join(json.dumps(r) for r in (good, dict(good, chosen=" grey."), bad_row)) + "\n")
    params = tmp_path / "params.yaml"
    write_params(params, data)
    out = tmp_path / "normalized"
    result = CliRunner().invoke(main, ["normalize", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 1
    assert str(data) in result.output and "row 2" in result.output
    assert re.search(problem, result.output), result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("normalized*"))


def test_a_missing_column_is_named(tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,chosen\nHi,Hello\n")
    params = tmp_path / "params.yaml"
    write_params(params, data)
    result = CliRunner().invoke(main, ["normalize", "--params", str(params), "--out", str(tmp_path / "n")])
    assert result.exit_code == 1 and "row 0" in result.output and "no 'rejected' column" in result.output


def test_a_failed_normalize_keeps_the_previous_artifact(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "yes", "rejected": "no"}) + "\n")
    params = tmp_path / "params.yaml"
    write_params(params, data, eval_fraction=0.5)
    out = tmp_path / "normalized"
    assert CliRunner().invoke(main, ["normalize", "--params", str(params), "--out", str(out)]).exit_code == 0
    before = (out / "manifest.json").read_text()
    data.write_text(json.dumps({"prompt": "Q", "chosen": None, "rejected": "no"}) + "\n")
    assert CliRunner().invoke(main, ["normalize", "--params", str(params), "--out", str(out)]).exit_code == 1
    assert (out / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    "params, message",
    [
        ({"train": {"betta": 0.1}}, "unknown key train.betta"),
        ({"data": {"on_invalid": "skip"}}, "data.on_invalid must be one of"),
        ({"tokenize": {"max_length": "long"}}, "tokenize.max_length must be int"),
        ({"modle": {}}, "unknown key modle"),
        ({"train": {"max_length": 512}}, "train.max_length belongs in tokenize.max_length"),
        ({"train": {"precompute_ref_batch_size": 8}}, "belongs in ref_logps.precompute_ref_batch_size"),
        ({"train": {"model_init_kwargs": {"dtype": "bfloat16"}}}, "belongs in model.model_init_kwargs"),
    ],
)
def test_params_mistakes_fail_fast_with_the_key(tmp_path, params, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["normalize", "--params", str(path), "--out", str(tmp_path / "n")])
    assert result.exit_code == 1 and message in result.output, result.output
    assert str(path) in result.output


def test_the_train_section_is_checked_against_dpo_config_by_the_stages_that_build_one(tmp_path):
    """normalize reads no train option and runs; train refuses the loss combination before reading anything."""
    path = tmp_path / "params.yaml"
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "yes", "rejected": "no"}) + "\n")
    write_params(path, data, eval_fraction=0.5)
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}
    path.write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(main, ["normalize", "--params", str(path), "--out", str(tmp_path / "n")]).exit_code == 0
    result = CliRunner().invoke(main, ["train", "--params", str(path), "--tokenized", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "loss_weights has 1 entries" in result.output and str(path) in result.output


def test_the_train_config_takes_the_data_options_from_their_stages(tmp_path):
    from conftest import tiny_params
    from pipeline.config.train_params import dpo_config as training_config

    params = tiny_params()
    params["tokenize"].update(max_length=77, truncation_mode="keep_end", dataset_num_proc=2)
    args = training_config(params, tmp_path / "out")
    assert (args.max_length, args.truncation_mode, args.dataset_num_proc) == (77, "keep_end", 2)
    assert args.precompute_ref_batch_size == params["ref_logps"]["precompute_ref_batch_size"]
