"""The params schema is the one home of every key: params.yaml is valid, the README documents every key."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.params import OWNED_ELSEWHERE, check_params, reference_markdown, reference_rows

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
                    assert isinstance(node, dict) and part in node, f"dvc.yaml stage {name} tracks {entry}, absent from params.yaml"
                    node = node[part]


def test_every_schema_key_has_help_and_the_readme_table_is_generated_from_the_schema():
    rows = reference_rows()
    assert all(help_text for _, _, help_text in rows), [key for key, _, h in rows if not h]
    keys = {key for key, _, _ in rows}
    assert {"model.peft.r", "ref_logps.precompute_ref_batch_size", "train.beta", "train.router_aux_loss_coef"} <= keys
    assert not {f"train.{name}" for name in OWNED_ELSEWHERE} & keys  # an option is documented at its one home
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- params:begin -->\n(.*?)<!-- params:end -->", readme, re.S).group(1)
    assert table == reference_markdown()


def test_an_owned_option_takes_its_default_and_rule_from_dpo_config():
    from pipeline.config import dpo_default

    params = check_params({})
    for option, home in OWNED_ELSEWHERE.items():
        section, name = home.split(".")
        assert params[section][name] == dpo_default(option), home
