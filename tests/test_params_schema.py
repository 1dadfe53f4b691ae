"""The params schema is the one home of every key: params.yaml is valid, docs/configuration.md documents every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config.params import OWNED_ELSEWHERE, check_params, reference_markdown, reference_rows
from pipeline.config.train_params import check_train
from pipeline.core.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_params_yaml_is_valid_and_sets_every_key_dvc_tracks_one_by_one():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    check_params(raw)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            if isinstance(entry, str):  # a key DVC reads from params.yaml: it must be there
                node = raw
                for part in entry.split("."):
                    assert isinstance(node, dict) and part in node, (
                        f"dvc.yaml stage {name} tracks {entry}, absent from params.yaml"
                    )
                    node = node[part]


def test_the_vision_params_are_valid_has_every_key_of_params_yaml_and_selects_the_vision_default():
    text, vision = (yaml.safe_load((ROOT / name).read_text()) for name in ("params.yaml", "vision/params.yaml"))
    checked = check_params(vision)
    assert (checked["model"]["name_or_path"], checked["data"]["train"]) == (
        "builtin:tiny-llava",
        "builtin:vision-colors",
    )
    assert checked["tokenize"]["max_length"] is None  # no image token is ever cut

    def keys(node: dict) -> set[str]:
        return {k for k in node} | {f"{k}.{sub}" for k, v in node.items() if isinstance(v, dict) for sub in keys(v)}

    assert keys(vision) == keys(text)  # vision/dvc.yaml tracks the same keys, one by one


def test_every_schema_key_has_help_and_the_docs_table_is_generated_from_the_schema():
    rows = reference_rows()
    assert all(help_text for _, _, help_text in rows), [key for key, _, h in rows if not h]
    keys = {key for key, _, _ in rows}
    assert {"model.peft.r", "ref_logps.precompute_ref_batch_size", "train.beta", "train.router_aux_loss_coef"} <= keys
    assert not {f"train.{name}" for name in OWNED_ELSEWHERE} & keys  # an option is documented at its one home
    page = (ROOT / "docs" / "configuration.md").read_text()  # the "Every params.yaml key" table
    table = re.search(r"<!-- params:begin -->\n(.*?)<!-- params:end -->", page, re.S).group(1)
    assert table == reference_markdown()


def test_an_owned_option_takes_its_default_and_rule_from_dpo_config():
    from pipeline.config.params import dpo_default

    params = check_params({})
    for option, home in OWNED_ELSEWHERE.items():
        section, name = home.split(".")
        assert params[section][name] == dpo_default(option), home


def test_a_report_to_integration_that_is_not_installed_is_refused_with_the_package_to_install(monkeypatch):
    import pytest
    import transformers.integrations

    from pipeline.core.errors import PipelineError

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["dvclive"])
    for report_to in ("wandb", ["dvclive", "wandb"]):
        with pytest.raises(
            PipelineError,
            match=r"train\.report_to names 'wandb', which is not installed: "
            r"`pip install wandb`",
        ):
            check_train(check_params({"train": {"report_to": report_to}}))
    assert check_train(check_params({"train": {"report_to": ["dvclive"]}}))["train"]["report_to"] == ["dvclive"]


def test_the_stage_config_keeps_gradient_checkpointing_without_a_deprecation_warning():
    import warnings

    from pipeline.config.train_params import dpo_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        params = check_train(check_params({}))
        assert dpo_config(params, "unused").gradient_checkpointing is True  # DPOConfig's default
        params = check_train(check_params({"train": {"gradient_checkpointing": False}}))
        args = dpo_config(params, "unused")
        assert args.gradient_checkpointing is False and args.activation_checkpointing is False
        assert (
            dpo_config(check_train(check_params({})), "unused", gradient_checkpointing=False).activation_checkpointing
            is False
        )


def test_the_builtin_task_makes_as_many_distinct_pairs_as_asked_or_refuses_up_front():
    import pytest

    from pipeline.builtin import task
    from pipeline.core.errors import PipelineError

    train_prompts, _ = task.split_prompts(0, 0.1)
    rows = task.preference_pairs(train_prompts, 20000, seed=1)  # drew a duplicate at row 9699 before
    keys = {(r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}
    assert len(keys) == 20000
    assert check_params({"data": {"builtin": {"num_pairs": 20000}}})["data"]["builtin"]["num_pairs"] == 20000
    most, _ = task.split_capacities(0.1)
    with pytest.raises(
        PipelineError,
        match=rf"data\.builtin\.num_pairs is {most + 1}, but the built-in task can "
        rf"make only {most} distinct pairs .* at most {most}",
    ):
        check_params({"data": {"builtin": {"num_pairs": most + 1}}})


@pytest.mark.parametrize(
    "raw, key, suggestion",
    [
        ({"train": {"betta": 0.1}}, "train.betta", "beta"),
        ({"modle": {}}, "modle", "model"),
        ({"model": {"name_or_pth": "x"}}, "model.name_or_pth", "name_or_path"),
        ({"model": {"peft": {"enabled": True, "rr": 8}}}, "model.peft.rr", "r"),
        ({"data": {"on_invalidd": "drop"}}, "data.on_invalidd", "on_invalid"),
        ({"tokenize": {"max_lenght": 64}}, "tokenize.max_lenght", "max_length"),
        ({"export": {"push": {"repoid": "a/b"}}}, "export.push.repoid", "repo_id"),
    ],
)
def test_an_unknown_key_suggests_the_near_miss_and_points_to_documentation_that_exists(raw, key, suggestion):
    with pytest.raises(PipelineError) as err:
        check_params(raw)
    message = str(err.value)
    assert f"unknown key {key}" in message and f"did you mean `{suggestion}`" in message, message
    assert "--help-keys" not in message, message
    assert "docs/configuration.md" in message and '"Every params.yaml key"' in message, message  # the page it names
    assert "## Every params.yaml key" in (ROOT / "docs" / "configuration.md").read_text()


def test_a_misspelt_train_option_names_the_one_meant_and_where_every_option_is_documented():
    with pytest.raises(PipelineError) as err:
        check_params({"train": {"betta": 0.1}})
    assert "unknown key train.betta (did you mean `beta`?)" in str(err.value)
    assert "help(pipeline.DPOConfig)" in str(err.value) and "--help-keys" not in str(err.value)


def test_an_unknown_key_far_from_every_valid_key_suggests_nothing():
    with pytest.raises(PipelineError) as err:
        check_params({"train": {"zzzzqqq": 1}})
    assert "did you mean" not in str(err.value) and "help(pipeline.DPOConfig)" in str(err.value)


def test_the_rounds_params_are_valid_and_set_every_key_each_round_s_stages_track():
    raw = yaml.safe_load((ROOT / "rounds" / "params.yaml").read_text())
    params = check_params(raw)
    assert list(params["iterate"]["rounds"]) == ["1", "2", "3"]
    stages = yaml.safe_load((ROOT / "rounds" / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        keys = [""] if "foreach" not in stage else list(params["iterate"]["rounds"])
        for key in keys:
            for entry in stage.get("do", stage).get("params", []):
                node = raw
                for part in entry.replace("${key}", key).split("."):
                    assert isinstance(node, dict) and part in node, f"rounds/dvc.yaml {name}@{key} tracks {entry}"
                    node = node[part]
