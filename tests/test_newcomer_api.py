"""What a newcomer and the reference trainer's own tests tripped on, through the public API as a user of the reference
trainer writes it: iterable training data at the defaults, raw datasets given to evaluate/predict, an iterable eval
set in a dict with precomputed reference log-probs, model tags, a trainer without train_dataset, push_to_hub
offline, and no deprecation warning on the adapter path."""

from __future__ import annotations

import logging
import warnings

import datasets
import pytest

from pipeline import DPOConfig, DPOTrainer
from pipeline.core.errors import PipelineError

RAW = [
    {"prompt": f"Is fact {i} true?", "chosen": f" Yes, fact {i} holds.", "rejected": f" No, fact {i} fails."}
    for i in range(8)
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": f"Is fact {i} true?"}],
        "chosen": [{"role": "assistant", "content": f"Yes, fact {i} holds."}],
        "rejected": [{"role": "assistant", "content": f"No, fact {i} fails."}],
    }
    for i in range(8)
]


def config(tmp_path, **options):
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=2,
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-4,
    )
    return DPOConfig(**{**base, **options})


def test_an_iterable_dataset_trains_at_the_default_layout(tmp_path, tiny_model, tiny_tokenizer):
    train = datasets.Dataset.from_list(RAW).to_iterable_dataset()
    trainer = DPOTrainer(model=tiny_model, args=config(tmp_path), train_dataset=train, processing_class=tiny_tokenizer)
    assert trainer.layout.options()["prefix_sharing"] and trainer.layout.options()["packing"]
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[-1]["train_loss"] > 0


@pytest.mark.parametrize("rows", [RAW, CONVERSATIONAL], ids=["standard", "conversational"])
@pytest.mark.parametrize("precompute", [False, True])
def test_evaluate_and_predict_take_a_raw_preference_dataset(tmp_path, tiny_model, tiny_tokenizer, rows, precompute):
    trainer = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path, precompute_ref_log_probs=precompute, per_device_eval_batch_size=4),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    metrics = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(rows[:5]))
    assert metrics["eval_rewards/accuracies"] is not None and metrics["eval_loss"] > 0
    assert metrics["eval_logps/chosen"] < 0
    predictions = trainer.predict(datasets.Dataset.from_list(rows[:3]))
    assert predictions.predictions.shape == (3, 2)


def test_evaluate_refuses_or_drops_invalid_rows_as_the_constructor_does(tmp_path, tiny_model, tiny_tokenizer):
    rows = [dict(r) for r in RAW]
    rows[2] = {"prompt": "Q", "chosen": " same", "rejected": " same"}
    trainer = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
    )
    with pytest.raises(PipelineError, match=r"eval_dataset: row 2: chosen and rejected are identical"):
        trainer.evaluate(eval_dataset=datasets.Dataset.from_list(rows))
    dropping = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path, on_invalid="drop", per_device_eval_batch_size=16),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
    )
    assert dropping.evaluate(eval_dataset=datasets.Dataset.from_list(rows))["eval_loss"] > 0
    assert dropping.predict(datasets.Dataset.from_list(rows)).predictions.shape == (7, 2)  # row 2 dropped


def test_an_iterable_eval_set_in_a_dict_is_refused_with_precomputed_reference(tmp_path, tiny_model, tiny_tokenizer):
    evals = {"held_out": datasets.Dataset.from_list(RAW).to_iterable_dataset()}
    with pytest.raises(PipelineError, match=r"IterableDataset \(eval_dataset\[held_out\]\)"):
        DPOTrainer(
            model=tiny_model,
            args=config(tmp_path, precompute_ref_log_probs=True),
            train_dataset=datasets.Dataset.from_list(RAW),
            eval_dataset=evals,
            processing_class=tiny_tokenizer,
        )


def test_the_trained_model_is_tagged_also_with_an_adapter(tmp_path, tiny_model, tiny_tokenizer):
    from peft import LoraConfig

    trainer = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
    )
    assert {"dpo", "pipeline"} <= set(trainer.model.model_tags)
    from pipeline.builtin.model import build_model

    base = build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)
    lora = DPOTrainer(
        model=base,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    assert {"dpo", "pipeline"} <= set(lora.model.model_tags)


def test_a_trainer_without_train_dataset_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(PipelineError, match=r"train_dataset is required"):
        DPOTrainer(model=tiny_model, args=config(tmp_path), processing_class=tiny_tokenizer)


def test_push_to_hub_offline_says_so_in_a_sentence(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path, hub_model_id="someone/tiny-dpo"),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
    )
    with pytest.raises(PipelineError) as err:
        trainer.push_to_hub()
    message = str(err.value)
    assert "someone/tiny-dpo" in message and "HF_HUB_OFFLINE" in message and "Hub" in message


def test_no_deprecation_warning_on_the_adapter_path(tmp_path, tiny_tokenizer, caplog):
    from peft import LoraConfig

    from pipeline.builtin.model import build_model

    model = build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        trainer = DPOTrainer(
            model=model,
            args=config(tmp_path, gradient_checkpointing=True),
            train_dataset=datasets.Dataset.from_list(RAW),
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )
        trainer.train()
    deprecations = [
        str(w.message)
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "deprecat" in str(w.message).lower()
    ]
    assert not [m for m in deprecations if "gradient_checkpointing" in m], deprecations


def test_after_training_a_raw_eval_set_is_scored_by_a_kept_reference_or_refused_with_the_ways_out(
    tmp_path, tiny_model, tiny_tokenizer
):
    from pipeline.builtin.model import build_model

    raw = datasets.Dataset.from_list(RAW[:4])
    trainer = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path, precompute_ref_log_probs=True),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    with pytest.raises(PipelineError, match=r"eval_dataset has no reference log-probs.*not kept once training"):
        trainer.evaluate(eval_dataset=raw)
    reference = build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)
    policy = build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2)
    explicit = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config(tmp_path, precompute_ref_log_probs=True),
        train_dataset=datasets.Dataset.from_list(RAW),
        processing_class=tiny_tokenizer,
    )
    explicit.train()
    assert explicit.evaluate(eval_dataset=raw)["eval_rewards/chosen"] != 0  # the policy moved from its reference


def test_a_hub_load_says_it_asks_the_hub_before_waiting(monkeypatch, caplog):
    import transformers
    from huggingface_hub import constants

    from pipeline.model.loading import load_causal_lm

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []

    def unreachable(name, **kwargs):  # the network's time-out, without the minute
        seen.extend(r.getMessage() for r in caplog.records)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.model.loading"),
        pytest.raises(PipelineError, match="HF_HUB_OFFLINE"),
    ):
        load_causal_lm("someone/unreachable-model")
    assert any("asking the Hub" in m and "HF_HUB_OFFLINE=1" in m for m in seen)
