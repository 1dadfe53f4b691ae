"""LoRA adapters in DPOTrainer: what trains, which reference is used, and what is refused."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from conftest import reference_logps
from pipeline import DPOConfig, DPOTrainer
from pipeline.core.errors import PipelineError
from pipeline.model.collator import DataCollatorForPreference
from pipeline.objective.reference import Reference


def make_rows(n: int = 16, seed: int = 0, vocab: int = 60) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(5, vocab) for _ in range(k)]

    return [
        {
            "row_id": f"r{i}",
            "prompt_ids": ids(rng.randint(2, 6)),
            "chosen_ids": ids(rng.randint(2, 5)),
            "rejected_ids": ids(rng.randint(2, 5)),
        }
        for i in range(n)
    ]


ROWS = make_rows()


def dataset(rows=ROWS):
    import datasets

    return datasets.Dataset.from_list(rows)


def config(tmp_path, **kwargs) -> DPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        max_steps=3,
        beta=0.5,
    )
    settings.update(kwargs)
    return DPOConfig(**settings)


def lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(
        **{
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
            "task_type": "CAUSAL_LM",
            **kwargs,
        }
    )


def logps(model, tokenizer, rows=ROWS, adapter_off=False) -> torch.Tensor:
    reference = Reference("adapter_off" if adapter_off else "policy", model, "")
    out = reference_logps(reference, rows, DataCollatorForPreference(tokenizer.pad_token_id), 8)
    return torch.tensor([out["ref_chosen_logps"], out["ref_rejected_logps"]])


def randomized_adapter(model, tmp_path, seed: int = 1):
    """A LoRA adapter with non-zero weights on `model`, saved to tmp_path/adapter (the 'earlier run')."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def base_names(peft_model) -> dict[str, torch.Tensor]:
    """The base weights of a PeftModel (tied ones once), by the plain model's names."""
    return {
        name.replace(".base_layer", ""): p
        for name, p in peft_model.get_base_model().named_parameters()
        if "lora_" not in name
    }


def base_state(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict (tied weights under every name), by the plain model's names."""
    return {
        name.replace(".base_layer", ""): t
        for name, t in peft_model.get_base_model().state_dict().items()
        if "lora_" not in name
    }


@pytest.fixture
def fresh_model(tiny_tokenizer):
    from pipeline.builtin.model import build_model

    return lambda: build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)


# ---- a new adapter ----------------------------------------------------------------------------------


def test_lora_training_changes_only_adapter_weights_and_reference_is_the_base(tmp_path, fresh_model, tiny_tokenizer):
    model = fresh_model()
    base_copy = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = DPOTrainer(
        model, args=config(tmp_path), train_dataset=dataset(), processing_class=tiny_tokenizer, peft_config=lora()
    )
    assert trainer.ref_model is None and trainer.reference.kind == "adapter_off"  # no second model
    trainer.train()
    policy = trainer.model
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    after = base_state(policy)
    assert set(after) == set(before)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), f"base weight {name} changed"
    lora_b = [p for name, p in policy.named_parameters() if "lora_B" in name]
    assert any(p.abs().max() > 0 for p in lora_b)  # LoRA B starts at zero: training moved it

    # the reference (adapter disabled) is exactly the base model; the adapter itself changes the log-probs
    policy.eval()
    ref = logps(policy, tiny_tokenizer, adapter_off=trainer.reference.kind == "adapter_off")
    base = logps(base_copy, tiny_tokenizer)
    assert torch.allclose(ref, base, atol=1e-5, rtol=0)
    assert (logps(policy, tiny_tokenizer) - base).abs().max() > 1e-3


def test_precomputed_reference_of_a_new_adapter_is_the_base_model(tmp_path, fresh_model, tiny_tokenizer):
    model = fresh_model()
    base_copy = copy.deepcopy(model)
    # an adapter whose B is non-zero from the start, so "adapter on" differs from the base at precompute time
    trainer = DPOTrainer(
        model,
        args=config(tmp_path, precompute_ref_log_probs=True),
        train_dataset=dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora(init_lora_weights=False),
    )
    precomputed = torch.tensor([trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]])
    assert torch.allclose(precomputed, logps(base_copy, tiny_tokenizer), atol=1e-5, rtol=0)
    assert (logps(trainer.model, tiny_tokenizer) - precomputed).abs().max() > 1e-3


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_adapter(tmp_path, fresh_model, tiny_tokenizer, reentrant):
    """Reentrant checkpointing passes gradients only to inputs that require them: the frozen embeddings'
    output must be made to, or the adapters inside the checkpointed blocks would never learn."""
    model = fresh_model()
    args = config(
        tmp_path, gradient_checkpointing=True, max_steps=2, gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    trainer = DPOTrainer(model, args=args, train_dataset=dataset(), processing_class=tiny_tokenizer, peft_config=lora())
    trainer.train()
    base = trainer.model.get_base_model()
    assert base.is_gradient_checkpointing
    assert any(p.abs().max() > 0 for name, p in trainer.model.named_parameters() if "lora_B" in name)
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_disable_dropout_reaches_policy_adapter_and_reference(tmp_path, tiny_tokenizer):
    from peft import PeftModel

    from pipeline.builtin.model import build_model

    def dropout_model():
        model = build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)
        for module in model.modules():  # as if built with attention_dropout=0.2
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.2
        return model

    def dropouts(model):  # nn.Dropout rates (LoRA's) and the attention layers' functional dropout rate
        return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] + [
            m.attention_dropout for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)
        ]

    trainer = DPOTrainer(
        dropout_model(),
        args=config(tmp_path),
        train_dataset=dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora(lora_dropout=0.1),
    )
    assert len(dropouts(trainer.model)) > 1 and set(dropouts(trainer.model)) == {0.0}
    kept = DPOTrainer(
        dropout_model(),
        args=config(tmp_path, disable_dropout=False),
        train_dataset=dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora(lora_dropout=0.1),
    )
    assert set(dropouts(kept.model)) == {0.1, 0.2}
    adapter = randomized_adapter(dropout_model(), tmp_path)
    continued = PeftModel.from_pretrained(dropout_model(), str(adapter), is_trainable=True)
    for module in continued.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    trainer = DPOTrainer(continued, args=config(tmp_path), train_dataset=dataset(), processing_class=tiny_tokenizer)
    assert set(dropouts(trainer.model)) == {0.0} and set(dropouts(trainer.ref_model)) == {0.0}


# ---- continuing an adapter --------------------------------------------------------------------------


def test_continuing_an_adapter_uses_the_starting_adapter_as_reference(tmp_path, fresh_model, tiny_tokenizer):
    from peft import PeftModel

    adapter = randomized_adapter(fresh_model(), tmp_path)
    start = PeftModel.from_pretrained(fresh_model(), str(adapter))  # the starting adapter, for comparison
    model = PeftModel.from_pretrained(fresh_model(), str(adapter), is_trainable=True)
    trainer = DPOTrainer(
        model, args=config(tmp_path, max_steps=3), train_dataset=dataset(), processing_class=tiny_tokenizer
    )
    ref = trainer.ref_model
    assert ref is not None and trainer.reference.kind == "initial_copy"
    # one copy of the base weights: the reference shares them with the policy; only the adapter is copied
    policy_base, ref_base = base_names(trainer.model), base_names(ref)
    assert all(ref_base[name] is policy_base[name] for name in policy_base)
    policy_lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(p is not policy_lora[n] for n, p in ref.named_parameters() if "lora_" in n)

    trainer.train()
    history = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    first = history[0]  # the policy before its first update is the starting adapter: rewards are zero
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[name] == pytest.approx(0.0, abs=1e-6), name
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(history[-1]["rewards/margins"]) > 1e-4  # and then the policy moved away from it

    # the reference stayed the starting adapter (not the base, not the trained policy)
    start_logps = logps(start, tiny_tokenizer)
    assert torch.allclose(logps(ref, tiny_tokenizer), start_logps, atol=1e-5, rtol=0)
    assert (logps(fresh_model(), tiny_tokenizer) - start_logps).abs().max() > 1e-3
    assert (logps(trainer.model, tiny_tokenizer) - start_logps).abs().max() > 1e-4


def test_continued_adapter_precomputed_reference_is_the_starting_adapter(tmp_path, fresh_model, tiny_tokenizer):
    from peft import PeftModel

    adapter = randomized_adapter(fresh_model(), tmp_path)
    start = PeftModel.from_pretrained(fresh_model(), str(adapter))
    model = PeftModel.from_pretrained(fresh_model(), str(adapter), is_trainable=True)
    trainer = DPOTrainer(
        model,
        args=config(tmp_path, precompute_ref_log_probs=True, max_steps=1),
        train_dataset=dataset(),
        processing_class=tiny_tokenizer,
    )
    assert trainer.ref_model is None  # nothing kept: the log-probs were taken from the policy before training
    precomputed = torch.tensor([trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]])
    assert torch.allclose(precomputed, logps(start, tiny_tokenizer), atol=1e-5, rtol=0)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "rewards/chosen" in e)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# ---- refusals and TR-DPO ----------------------------------------------------------------------------


def test_peft_model_with_peft_config_is_refused(tmp_path, fresh_model, tiny_tokenizer):
    from peft import get_peft_model

    with pytest.raises(PipelineError, match="PeftModel and a peft_config"):
        DPOTrainer(
            get_peft_model(fresh_model(), lora()),
            args=config(tmp_path),
            train_dataset=dataset(),
            processing_class=tiny_tokenizer,
            peft_config=lora(),
        )


def test_sync_ref_model_with_peft_and_no_standalone_reference_is_refused(tmp_path, fresh_model, tiny_tokenizer):
    from peft import PeftModel

    with pytest.raises(PipelineError, match="sync_ref_model=True is not supported with a PEFT model"):
        DPOTrainer(
            fresh_model(),
            args=config(tmp_path, sync_ref_model=True),
            train_dataset=dataset(),
            processing_class=tiny_tokenizer,
            peft_config=lora(),
        )
    continued = PeftModel.from_pretrained(
        fresh_model(), str(randomized_adapter(fresh_model(), tmp_path)), is_trainable=True
    )
    with pytest.raises(PipelineError, match="sync_ref_model=True is not supported with a PEFT model"):
        DPOTrainer(
            continued,
            args=config(tmp_path, sync_ref_model=True),
            train_dataset=dataset(),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(PipelineError, match="sync_ref_model=True cannot be combined with precompute_ref_log_probs"):
        config(tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)


def test_tr_dpo_with_a_lora_policy_mixes_the_merged_policy_into_a_standalone_reference(
    tmp_path, fresh_model, tiny_tokenizer
):
    alpha = 0.25
    reference = fresh_model()
    with torch.no_grad():  # a reference distinct from the policy's base
        for p in reference.parameters():
            p.add_(0.01)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    trainer = DPOTrainer(
        fresh_model(),
        ref_model=reference,
        args=config(tmp_path, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=alpha, max_steps=1),
        train_dataset=dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    merged = copy.deepcopy(trainer.model).merge_and_unload().state_dict()  # peft's own merge, for comparison
    for name, value in trainer.ref_model.state_dict().items():
        expected = alpha * merged[name] + (1 - alpha) * ref_before[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    base = base_state(trainer.model)  # the adapter's delta was part of what was mixed in
    assert not torch.allclose(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_training_a_peft_model_loaded_without_is_trainable_is_refused_with_the_fix(
    tmp_path, fresh_model, tiny_tokenizer
):
    from peft import PeftModel

    frozen = PeftModel.from_pretrained(
        fresh_model(), str(randomized_adapter(fresh_model(), tmp_path))
    )  # is_trainable False
    trainer = DPOTrainer(frozen, args=config(tmp_path), train_dataset=dataset(), processing_class=tiny_tokenizer)
    with pytest.raises(PipelineError, match=r"no trainable parameters.*is_trainable=True"):
        trainer.train()
