"""Credentials never reach an artifact, a manifest, the model card or a message (issue 13): params.yaml refuses
credential fields and token-shaped values, a Hub token from the environment (or any token-shaped text) is masked
wherever params are recorded, and the Trainer's pickled args (training_args.bin) hold none."""

from __future__ import annotations

import pytest
import torch

import stages.evaluate as evaluate_stage
import stages.export as export_stage
import stages.train as train_stage
from pipeline.config.params import check_params
from pipeline.config.train_params import check_train
from pipeline.core.errors import PipelineError
from pipeline.core.redaction import REDACTED, redact, redact_text

FAKE_TOKEN = "hf_FAKEtokenFORtestsONLY0123456789abcd"
OTHER_TOKEN = "hf_ANOTHERfakeTOKENforTESTSonly987654321"  # never in the environment
LEGACY_TOKEN = "api_org_FAKElegacyTOKENforTESTS0123"  # a token of another shape: only masked as the environment's


def test_credential_fields_in_params_are_refused_with_the_env_var_to_use():
    with pytest.raises(PipelineError, match=r"train\.hub_token .*HF_TOKEN") as err:
        check_params({"train": {"hub_token": FAKE_TOKEN}})
    assert FAKE_TOKEN not in str(err.value)
    with pytest.raises(PipelineError, match=r"model\.model_init_kwargs\.token .*HF_TOKEN"):
        check_params({"model": {"model_init_kwargs": {"token": FAKE_TOKEN}}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"run_name": OTHER_TOKEN}}, "train.run_name"),
        ({"train": {"run_name": f"run-{OTHER_TOKEN}-2"}}, "train.run_name"),
        ({"data": {"columns": {"chosen": OTHER_TOKEN}}}, "data.columns.chosen"),
        (
            {"model": {"peft": {"enabled": True, "target_modules": ["q_proj", OTHER_TOKEN]}}},
            r"model.peft.target_modules\[1\]",
        ),
    ],
)
def test_a_token_pasted_into_any_param_is_refused_naming_the_key(raw, key, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PipelineError, match=rf"params: {key} holds what looks like a Hugging Face token") as err:
        check_params(raw)
    assert "set the HF_TOKEN environment variable instead" in str(err.value)
    assert OTHER_TOKEN not in str(err.value)
    check_params({"train": {"run_name": "hf_short-name"}})  # not token-shaped: accepted


def test_token_shaped_text_is_masked_without_the_environment(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert redact_text(f"Authorization: Bearer {OTHER_TOKEN}.") == f"Authorization: Bearer {REDACTED}."
    assert redact_text("hf_tooShort1234 and my_hf_dir") == "hf_tooShort1234 and my_hf_dir"
    assert OTHER_TOKEN not in str(PipelineError(f"bad value {OTHER_TOKEN!r}"))


def test_training_args_bin_holds_no_token_while_the_trainer_keeps_it(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """DPOConfig(hub_token=...) through the API: checkpoint and output hold no token (training_args.bin is a pickle
    of the args), while the running trainer's args still do (a push to the Hub reads the token there)."""
    from pipeline import DPOConfig, DPOTrainer
    from test_peft_trainer import dataset, make_rows

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    args = DPOConfig(
        output_dir=str(out),
        hub_token=FAKE_TOKEN,
        run_name=f"run-{OTHER_TOKEN}",
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
    )
    trainer = DPOTrainer(tiny_model, args=args, train_dataset=dataset(make_rows(8)), processing_class=tiny_tokenizer)
    trainer.train()
    trainer.save_model()
    assert trainer.args is args and args.hub_token == FAKE_TOKEN and args.run_name == f"run-{OTHER_TOKEN}"

    saved = [out / "checkpoint-1" / "training_args.bin", out / "training_args.bin"]
    for path in saved:
        recorded = torch.load(path, weights_only=False)
        assert type(recorded) is type(args) and recorded.hub_token is None, path
        assert recorded.run_name == f"run-{REDACTED}" and recorded.save_strategy == args.save_strategy
        assert recorded.max_steps == 1 and recorded.output_dir == str(out)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert set(saved) <= set(files) and any(f.name == "model.safetensors" for f in files)
    leaks = [
        str(f.relative_to(tmp_path))
        for f in files
        if FAKE_TOKEN.encode() in f.read_bytes() or OTHER_TOKEN.encode() in f.read_bytes()
    ]
    assert leaks == []


def test_error_messages_never_show_the_environment_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(PipelineError, match="on_invalid") as err:  # a message that quotes the value it refuses
        check_params({"data": {"on_invalid": FAKE_TOKEN}})
    assert FAKE_TOKEN not in str(err.value) and REDACTED in str(err.value)
    with pytest.raises(PipelineError, match="learning_rate") as err:
        check_train(check_params({"train": {"learning_rate": FAKE_TOKEN}}))
    assert FAKE_TOKEN not in str(err.value)


def test_redact_masks_credential_fields_and_the_environment_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    recorded = redact(
        {
            "train": {"hub_token": "x", "run_name": FAKE_TOKEN, "beta": 0.1},
            "model": {"model_init_kwargs": {"token": "y"}},
            "note": [f"Bearer {FAKE_TOKEN}"],
        }
    )
    assert recorded == {
        "train": {"hub_token": REDACTED, "run_name": REDACTED, "beta": 0.1},
        "model": {"model_init_kwargs": {"token": REDACTED}},
        "note": [f"Bearer {REDACTED}"],
    }


def test_no_artifact_holds_the_hub_token(tmp_path, monkeypatch, capfd):
    """The whole pipeline with HF_TOKEN set, and the environment's other token (not hf_-shaped, so params.yaml does
    not refuse it) pasted into a recorded param (run_name): no file under any artifact directory (manifests, model
    card, weights, .bin files) contains either. (An hf_ token pasted into a param is refused: see above.)"""
    from conftest import prepare_stages, tiny_params

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", LEGACY_TOKEN)
    params = tiny_params(run_name=LEGACY_TOKEN)
    params["data"]["builtin"].update(num_pairs=16, num_eval_pairs=8)
    params["evaluate"]["num_generations"] = 2
    root = tmp_path / "artifacts"
    prepare_stages(params, root, through="ref-logps")
    p = {name: root / name for name in ("train", "checkpoints", "live", "eval", "export")}
    metrics, report = root / "results" / "eval.json", root / "results" / "report.html"
    train_stage.run(
        params,
        root / "tokenized",
        root / "ref_logps",
        root / "base",
        p["train"],
        p["checkpoints"],
        p["live"],
        say=print,
    )
    evaluate_stage.run(
        params,
        p["train"],
        root / "tokenized",
        root / "ref_logps",
        root / "normalized",
        root / "base",
        p["eval"],
        metrics,
        p["live"],
        report,
    )
    export_stage.run(params, p["train"], root / "normalized", root / "base", metrics, p["export"])
    files = [f for f in root.rglob("*") if f.is_file()]
    assert len(files) > 20 and any(f.name == "README.md" for f in files)
    assert any(REDACTED in f.read_text() for f in files if f.name == "manifest.json")
    leaks = [
        str(f.relative_to(root))
        for f in files
        if FAKE_TOKEN.encode() in f.read_bytes() or LEGACY_TOKEN.encode() in f.read_bytes()
    ]
    assert leaks == []
    printed = capfd.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err and LEGACY_TOKEN not in printed.out + printed.err


def test_pickled_args_hold_no_token_while_the_live_and_deep_copied_ones_keep_it(tmp_path):
    """Every torch.save(args) of the Trainer (checkpoints, the output, a push during training) pickles the args."""
    import copy
    import pickle

    from pipeline import DPOConfig

    token = "hf_" + "q" * 34
    args = DPOConfig(output_dir=str(tmp_path), hub_token=token, run_name=f"run-{token}", report_to="none")
    restored = pickle.loads(pickle.dumps(args))
    assert restored.hub_token is None and token not in restored.run_name and token.encode() not in pickle.dumps(args)
    assert args.hub_token == token and copy.deepcopy(args).hub_token == token
    assert restored.lr_scheduler_type == args.lr_scheduler_type  # an enum stays an enum
