"""Every refused combination of the validation rules, with the message that names the fix."""

from __future__ import annotations

import importlib.util
import re

import datasets
import pytest

from pipeline import DPOConfig, DPOTrainer
from pipeline.config.params import OWNED_ELSEWHERE, check_params
from pipeline.config.train_params import check_train
from pipeline.core.errors import PipelineError

PAIRS = [{"prompt_ids": [2, 5, 40], "chosen_ids": [50, 3], "rejected_ids": [60, 3]}]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"beta": 0.0}, r"beta must be > 0"),
        ({"beta": -1.0}, r"beta must be > 0"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"loss_weights has 1 entries but loss_type has 2"),
        ({"loss_type": ["dpo"]}, r"unknown loss_type \['dpo'\]"),
        ({"f_divergence_type": "kl"}, r"unknown f_divergence_type 'kl'"),
        ({"loss_type": ["exo_pair"]}, r"'exo_pair' needs label_smoothing > 0.*1e-3"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, r"'robust' needs label_smoothing in \[0, 0.5\)"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
        ({"ld_alpha": -0.1}, r"ld_alpha must be in \[0, 1\]"),
        ({"use_weighting": True, "loss_type": ["aot"]}, r"use_weighting=True is not supported with loss_type 'aot'"),
        ({"use_weighting": True, "loss_type": ["aot_unpaired"]}, r"use_weighting=True is not supported"),
        (
            {"use_liger_kernel": True, "loss_type": ["sigmoid", "sft"]},
            r"use_liger_kernel=True supports a single loss_type",
        ),
        (
            {"use_liger_kernel": True, "precompute_ref_log_probs": True},
            r"use_liger_kernel=True is not supported with precompute_ref_log_probs",
        ),
        (
            {"sync_ref_model": True, "precompute_ref_log_probs": True},
            r"sync_ref_model=True cannot be combined with precompute_ref_log_probs",
        ),
        ({"truncation_mode": "middle"}, r"truncation_mode must be one of"),
        ({"loss_type": ["exo_pair"], "label_smoothing": 1.0}, r"'exo_pair' needs label_smoothing > 0 and < 1.*1e-3"),
        ({"num_train_epochs": -1}, r"num_train_epochs must be > 0 .*untrained model"),
        ({"num_train_epochs": 0}, r"num_train_epochs must be > 0"),
        ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size must be >= 1 \(got 0\)"),
        ({"learning_rate": -1.0}, r"learning_rate must be >= 0 \(got -1.0\)"),
        ({"precompute_ref_batch_size": 0}, r"precompute_ref_batch_size must be >= 1 \(got 0\)"),
        ({"max_length": 1}, r"max_length must be >= 2 \(got 1\); or null"),
        ({"router_aux_loss_coef": -0.1}, r"router_aux_loss_coef must be >= 0"),
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be >= 1"),
    ],
)
def test_refused_at_configuration_time_in_the_api_and_in_params(options, message):
    with pytest.raises(PipelineError, match=message):
        DPOConfig(output_dir="unused", **options)
    raw, sections = {"train": options}, {"train"}
    for key in set(options) & set(OWNED_ELSEWHERE):  # params.yaml's home of a data option is its stage's section
        section, name = OWNED_ELSEWHERE[key].split(".")
        raw, sections = {section: {name: options[key]}}, {section}
    with pytest.raises(PipelineError) as caught:
        check_train(check_params(raw))
    said = str(caught.value)
    # the same rule, in params.yaml's words: each option named with its section
    assert said.startswith("params: ") and any(f"{s}." in said for s in sections), said
    assert re.search(message, re.sub(r"\b(train|tokenize|ref_logps)\.", "", said)), said


def test_a_yaml_string_number_is_read_as_hf_argument_parser_reads_it():
    params = check_train(check_params({"train": {"learning_rate": "3e-5", "num_train_epochs": "2"}}))
    assert params["train"]["learning_rate"] == 3e-5 and params["train"]["num_train_epochs"] == 2.0
    with pytest.raises(PipelineError, match=r"train.learning_rate must be float, got 'fast'"):
        check_train(check_params({"train": {"learning_rate": "fast"}}))
    with pytest.raises(PipelineError, match=r"train.per_device_train_batch_size must be int, got 2.5"):
        check_train(check_params({"train": {"per_device_train_batch_size": 2.5}}))
    with pytest.raises(PipelineError, match=r"train.lr_scheduler_type must be one of \['linear', .*got 'wavy'"):
        check_train(check_params({"train": {"lr_scheduler_type": "wavy"}}))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"peft": {"r": 0}}}, r"model.peft.r must be >= 1 \(got 0\)"),
        (
            {"model": {"builtin": {"hidden_size": 30, "num_heads": 4}}},
            r"hidden_size \(30\) must be a multiple of .*num_heads",
        ),
        ({"ref_logps": {"precompute_ref_batch_size": 0}}, r"ref_logps.precompute_ref_batch_size must be >= 1"),
        ({"tokenize": {"batch_size": 0}}, r"tokenize.batch_size must be >= 1"),
        ({"data": {"eval_fraction": 1.0}}, r"data.eval_fraction must be in \(0, 1\)"),
        ({"model": {"builtin": {"warmup_learning_rate": "3e-3x"}}}, r"warmup_learning_rate must be float"),
        ({"export": {"push": {"enabled": True}}}, r"export.push.repo_id is not set"),
    ],
)
def test_params_sections_refuse_bad_values_with_the_key(raw, message):
    with pytest.raises(PipelineError, match=message):
        check_train(check_params(raw))


def test_yaml_no_for_a_string_option_reads_as_no():
    assert check_train(check_params({"train": {"save_strategy": False}}))["train"]["save_strategy"] == "no"


def trainer(tmp_path, model, tokenizer, **kwargs):
    args = kwargs.pop("args", None) or DPOConfig(
        output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False
    )
    return DPOTrainer(model=model, args=args, processing_class=tokenizer, **kwargs)


def test_model_and_ref_model_being_the_same_object(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(PipelineError, match="model and ref_model are the same object"):
        trainer(
            tmp_path, tiny_model, tiny_tokenizer, ref_model=tiny_model, train_dataset=datasets.Dataset.from_list(PAIRS)
        )


def test_liger_without_the_package_and_with_compute_metrics(tmp_path, tiny_model, tiny_tokenizer):
    installed = importlib.util.find_spec("liger_kernel") is not None
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_liger_kernel=True)
    with pytest.raises(PipelineError, match="does not support compute_metrics"):
        trainer(
            tmp_path,
            tiny_model,
            tiny_tokenizer,
            args=args,
            compute_metrics=lambda p: {},
            train_dataset=datasets.Dataset.from_list(PAIRS),
        )
    if not installed:
        with pytest.raises(PipelineError, match=r"needs the optional Liger Kernel.*pip install"):
            trainer(tmp_path, tiny_model, tiny_tokenizer, args=args, train_dataset=datasets.Dataset.from_list(PAIRS))


def test_precompute_with_an_iterable_dataset(tmp_path, tiny_model, tiny_tokenizer):
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", precompute_ref_log_probs=True)
    iterable = datasets.Dataset.from_list(PAIRS).to_iterable_dataset()
    with pytest.raises(PipelineError, match="not supported with an IterableDataset"):
        trainer(tmp_path, tiny_model, tiny_tokenizer, args=args, train_dataset=iterable)


def test_sync_ref_model_with_a_peft_model_without_standalone_reference(tmp_path, tiny_model, tiny_tokenizer):
    from peft import LoraConfig

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", sync_ref_model=True, gradient_checkpointing=False)
    with pytest.raises(PipelineError, match="sync_ref_model=True is not supported with a PEFT model"):
        trainer(
            tmp_path,
            tiny_model,
            tiny_tokenizer,
            args=args,
            peft_config=LoraConfig(r=2, target_modules="all-linear"),
            train_dataset=datasets.Dataset.from_list(PAIRS),
        )


@pytest.mark.parametrize(
    "mode, message",
    [
        ("keep_end", "truncation_mode='keep_end' is not supported with a vision dataset"),
        ("keep_start", "the model is text-only"),
    ],
)
def test_vision_datasets(tmp_path, tiny_model, tiny_tokenizer, mode, message):
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", truncation_mode=mode)
    rows = [dict(PAIRS[0], images=[[0, 1]])]
    with pytest.raises(PipelineError, match=message):
        trainer(tmp_path, tiny_model, tiny_tokenizer, args=args, train_dataset=datasets.Dataset.from_list(rows))
