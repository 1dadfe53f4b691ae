"""DPOConfig.router_aux_loss_coef and trust_remote_code: the options of the reference trainer's current release."""

from __future__ import annotations

import datasets
import pytest
import torch

from pipeline import DPOConfig, DPOTrainer
from pipeline.run.trainer import DPOScorer  # a trainer built without data (it only scores)

PAIRS = [
    {"prompt_ids": [2, 5, 9 + i], "chosen_ids": [20 + i, 21, 3], "rejected_ids": [30, 31 + i, 3]} for i in range(4)
]


def tiny_moe(tokenizer, output_router_logits: bool):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=output_router_logits,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MixtralForCausalLM(config)


def first_loss(tmp_path, tokenizer, coef: float, output_router_logits: bool = True) -> tuple[float, dict]:
    args = DPOConfig(
        output_dir=str(tmp_path / f"out-{coef}"),
        report_to="none",
        gradient_checkpointing=False,
        router_aux_loss_coef=coef,
        loss_type=["sigmoid", "sft"],
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        tiny_moe(tokenizer, output_router_logits),
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(PAIRS),
    )
    batch = trainer._prepare_inputs(trainer.data_collator(PAIRS))
    loss = trainer.compute_loss(trainer.model, batch).item()
    return loss, trainer.pop_metrics("train")


def test_router_load_balancing_loss_is_added_with_its_weight(tmp_path, tiny_tokenizer):
    without, metrics = first_loss(tmp_path, tiny_tokenizer, 0.0)
    aux = metrics["aux_loss"]
    assert aux > 0  # a 4-expert router always has a positive balancing loss
    with_coef, _ = first_loss(tmp_path, tiny_tokenizer, 0.5)
    assert with_coef == pytest.approx(without + 0.5 * aux, rel=1e-5)
    # the terms of a combined objective are logged beside the total
    assert set(metrics) >= {"loss/sigmoid", "loss/sft", "aux_loss"}
    # a model that returns no router logits gets no aux term, whatever the coefficient
    plain, plain_metrics = first_loss(tmp_path, tiny_tokenizer, 0.5, output_router_logits=False)
    assert "aux_loss" not in plain_metrics and plain == pytest.approx(without, rel=1e-5)


def test_trust_remote_code_reaches_from_pretrained_and_is_off_by_default(
    tmp_path, tiny_model, tiny_tokenizer, monkeypatch
):
    from transformers import AutoModelForCausalLM

    import pipeline.model.loading

    seen = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        pipeline.model.loading.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: seen.append(k["trust_remote_code"]) or real(*a, **k),
    )
    assert DPOConfig(output_dir=str(tmp_path)).policy_init_kwargs() == {"trust_remote_code": False}
    args = DPOConfig(
        output_dir=str(tmp_path),
        trust_remote_code=True,
        model_init_kwargs={"dtype": "float32"},
        ref_model_init_kwargs={"dtype": "bfloat16"},
    )
    assert args.policy_init_kwargs() == {"trust_remote_code": True, "dtype": "float32"}
    assert args.reference_init_kwargs() == {"trust_remote_code": True, "dtype": "bfloat16"}
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    trainer = DPOScorer(
        str(path), args=DPOConfig(output_dir=str(tmp_path / "o"), report_to="none", trust_remote_code=True)
    )
    assert trainer.model.config.vocab_size == tiny_model.config.vocab_size
    DPOScorer(str(path), args=DPOConfig(output_dir=str(tmp_path / "o"), report_to="none"))
    assert seen == [True, False]
