"""Credentials never reach an artifact, a manifest, the model card or a message (issue 13): params.yaml refuses
credential fields, and a Hub token from the environment is masked wherever params are recorded."""

from __future__ import annotations

import pytest

import stages.evaluate as evaluate_stage
import stages.export as export_stage
import stages.train as train_stage
from pipeline.errors import PipelineError
from pipeline.params import check_params
from pipeline.redaction import REDACTED, redact

FAKE_TOKEN = "hf_FAKEtokenFORtestsONLY0123456789abcd"


def test_credential_fields_in_params_are_refused_with_the_env_var_to_use():
    with pytest.raises(PipelineError, match=r"train\.hub_token .*HF_TOKEN") as err:
        check_params({"train": {"hub_token": FAKE_TOKEN}})
    assert FAKE_TOKEN not in str(err.value)
    with pytest.raises(PipelineError, match=r"model\.model_init_kwargs\.token .*HF_TOKEN"):
        check_params({"model": {"model_init_kwargs": {"token": FAKE_TOKEN}}})


def test_error_messages_never_show_the_environment_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(PipelineError, match="learning_rate") as err:
        check_params({"train": {"learning_rate": FAKE_TOKEN}})
    assert FAKE_TOKEN not in str(err.value) and REDACTED in str(err.value)


def test_redact_masks_credential_fields_and_the_environment_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    recorded = redact({"train": {"hub_token": "x", "run_name": FAKE_TOKEN, "beta": 0.1},
                       "model": {"model_init_kwargs": {"token": "y"}}, "note": [f"Bearer {FAKE_TOKEN}"]})
    assert recorded == {"train": {"hub_token": REDACTED, "run_name": REDACTED, "beta": 0.1},
                        "model": {"model_init_kwargs": {"token": REDACTED}}, "note": [f"Bearer {REDACTED}"]}


def test_no_artifact_holds_the_hub_token(tmp_path, monkeypatch, capfd):
    """The whole pipeline with HF_TOKEN set, and the token also pasted into a recorded param (run_name): no file
    under any artifact directory (manifests, model card, weights, .bin files) contains it."""
    from conftest import prepare_stages, tiny_params

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
    params = tiny_params(run_name=FAKE_TOKEN)
    params["data"]["builtin"].update(num_pairs=16, num_eval_pairs=8)
    params["evaluate"]["num_generations"] = 2
    root = tmp_path / "artifacts"
    prepare_stages(params, root, through="ref-logps")
    p = {name: root / name for name in ("train", "checkpoints", "live", "eval", "export")}
    metrics, report = root / "results" / "eval.json", root / "results" / "report.html"
    train_stage.run(params, root / "tokenized", root / "ref_logps", root / "base", p["train"], p["checkpoints"],
                    p["live"], say=print)
    evaluate_stage.run(params, p["train"], root / "tokenized", root / "ref_logps", root / "normalized", root / "base",
                       p["eval"], metrics, p["live"], report)
    export_stage.run(params, p["train"], root / "normalized", root / "base", metrics, p["export"])
    files = [f for f in root.rglob("*") if f.is_file()]
    assert len(files) > 20 and any(f.name == "README.md" for f in files)
    assert any(REDACTED in f.read_text() for f in files if f.name == "manifest.json")
    leaks = [str(f.relative_to(root)) for f in files if FAKE_TOKEN.encode() in f.read_bytes()]
    assert leaks == []
    printed = capfd.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err
