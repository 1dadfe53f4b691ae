"""Model initialization: from_pretrained keywords from params/DPOConfig, remote code off, references, QLoRA,
params checks."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import DPOConfig
from pipeline.config.train_params import check_train
from pipeline.core.errors import PipelineError
from pipeline.model.loading import init_kwargs, load_causal_lm
from pipeline.run.trainer import DPOScorer  # a trainer built without data (it only scores)


@pytest.fixture
def model_dir(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_init_kwargs_pass_dtype_names_to_from_pretrained_and_params_refuse_unknown_ones():
    from pipeline.config.params import check_params

    assert init_kwargs({"dtype": "bfloat16"}) == {"dtype": "bfloat16"}  # from_pretrained reads the name itself
    assert init_kwargs({"dtype": "auto", "revision": "abc"}) == {"dtype": "auto", "revision": "abc"}
    for key in ("model_init_kwargs", "ref_model_init_kwargs"):
        with pytest.raises(PipelineError, match=rf"model.{key}.dtype is not a dtype.*bfloat16"):
            check_params({"model": {key: {"dtype": "float8"}}})


def test_from_pretrained_keywords_reach_the_model(model_dir):
    model = load_causal_lm(str(model_dir), {"dtype": "bfloat16", "attn_implementation": "eager"})
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert load_causal_lm(str(model_dir), {"dtype": "float32"}).dtype == torch.float32


def test_trainer_loads_policy_and_reference_by_path_with_their_own_init_kwargs(tmp_path, model_dir):
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        model_init_kwargs={"dtype": "bfloat16"},
        ref_model_init_kwargs={"dtype": "float32"},
    )
    trainer = DPOScorer(str(model_dir), ref_model=str(model_dir), args=args)
    assert trainer.model.dtype == torch.bfloat16 and trainer.ref_model.dtype == torch.float32
    assert trainer.processing_class.pad_token is not None
    inherit = DPOConfig(output_dir=str(tmp_path / "out"), report_to="none", model_init_kwargs={"dtype": "bfloat16"})
    trainer = DPOScorer(str(model_dir), ref_model=str(model_dir), args=inherit)
    assert trainer.ref_model.dtype == torch.bfloat16  # no ref_model_init_kwargs: the policy's
    # no ref_model: the reference is a frozen copy of the initial policy
    trainer = DPOScorer(str(model_dir), args=DPOConfig(output_dir=str(tmp_path / "out"), report_to="none"))
    assert trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trainer.ref_model.parameters(), trainer.model.parameters()))


def test_remote_code_is_never_run_unless_asked(tmp_path, monkeypatch):
    """A model directory whose config points at custom code: refused by default, and the code never runs."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the copied code in tmp
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    path = tmp_path / "custom"
    path.mkdir()
    marker = tmp_path / "code-ran"
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dpo-pipeline-custom",
                "architectures": ["CustomModel"],
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomModel",
                },
            }
        )
    )
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (path / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(PipelineError, match="trust_remote_code=True"):
        load_causal_lm(str(path))
    assert not marker.exists()
    with pytest.raises(Exception):  # asked for: the code runs (and, being a stand-in, defines no model)
        load_causal_lm(str(path), {"trust_remote_code": True})
    assert marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_clearly_without_cuda(model_dir):
    with pytest.raises(PipelineError, match="needs a CUDA GPU and bitsandbytes"):
        load_causal_lm(
            str(model_dir), {"quantization_config": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}}
        )


# ---- params ---------------------------------------------------------------------------------------


def test_params_model_section_builds_lora_and_from_pretrained_kwargs():
    from pipeline.config.params import check_params
    from pipeline.model.loading import model_kwargs, peft_config

    params = check_params(
        {
            "model": {
                "attn_implementation": "sdpa",
                "model_init_kwargs": {"dtype": "bfloat16"},
                "ref_model_init_kwargs": {"dtype": "float32"},
                "peft": {"enabled": True, "r": 8, "target_modules": ["q_proj", "v_proj"]},
            }
        }
    )
    assert model_kwargs(params) == {"trust_remote_code": False, "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert model_kwargs(params, reference=True)["dtype"] == "float32"
    config = peft_config(params)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (8, 32, {"q_proj", "v_proj"})
    assert peft_config(check_params({})) is None  # the committed default: full fine-tuning
    assert (
        check_params({"model": {"peft": {"target_modules": "all-linear"}}})["model"]["peft"]["target_modules"]
        == "all-linear"
    )
    qlora = check_params({"model": {"peft": {"enabled": True}, "quantization": {"load_in_4bit": True}}})
    assert model_kwargs(qlora)["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize(
    "model, train, message",
    [
        ({"peft": {"target_modules": 3}}, {}, r"model.peft.target_modules must be str or list"),
        ({"peft": {"enabled": True}, "adapter": "some/adapter"}, {}, "PeftModel and a peft_config"),
        ({"quantization": {"load_in_4bit": True}}, {}, "set model.peft.enabled: true"),
        (
            {"peft": {"enabled": True}},
            {"sync_ref_model": True, "precompute_ref_log_probs": False},
            "not supported when training with PEFT models that do not keep a standalone ref_model",
        ),
        (
            {},
            {"sync_ref_model": True, "precompute_ref_log_probs": True},
            "cannot be combined with precompute_ref_log_probs",
        ),
        ({}, {"resume": 3}, "train.resume: true"),
        ({"ref_model_init_kwargs": "bf16"}, {}, "ref_model_init_kwargs must be dict or null"),
        ({"peft": {"bias": "some"}}, {}, "model.peft.bias must be one of"),
    ],
)
def test_params_refuse_model_combinations_that_cannot_work(model, train, message):
    from pipeline.config.params import check_params

    with pytest.raises(PipelineError, match=message):
        check_train(check_params({"model": model, "train": train}))


def test_params_accept_resume_and_keep_it_out_of_dpo_config(tmp_path):
    from pipeline.config.params import check_params
    from pipeline.config.train_params import dpo_config as training_config

    for value in (True, False, "artifacts/checkpoints/checkpoint-50", None):
        params = check_train(check_params({"train": {"resume": value, "report_to": "none"}}))
        assert params["train"]["resume"] == value
        assert not hasattr(training_config(params, tmp_path), "resume")
    with_sync = check_train(
        check_params(
            {"model": {"peft": {"enabled": True}, "ref_name_or_path": "some/ref"}, "train": {"sync_ref_model": True}}
        )
    )
    assert with_sync["train"]["sync_ref_model"] is True  # a standalone reference: TR-DPO with PEFT is fine
