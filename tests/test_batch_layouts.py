"""Prefix-shared and packed batches (pipeline.model.collator, pipeline.model.attention) give the padded batch's
numbers, values
and gradients (fp32, ≤ 1e-5), for every loss type and option, train and eval, plain and PEFT models, in the
reference pass too; the fastest layout is the default; a model that cannot take a layout falls back, with a log."""

from __future__ import annotations

import contextlib
import logging

import datasets
import pyarrow as pa
import pytest
import torch

import pipeline.model.layout
from conftest import random_pairs
from pipeline import DPOConfig, DPOTrainer
from pipeline.model.attention import allowed
from pipeline.model.batch_layout import BatchLayout
from pipeline.model.collator import CHOSEN, PROMPT, REJECTED, DataCollatorForPreference, first_fit
from pipeline.model.layout import batch_layout, layout_problem
from pipeline.objective.losses import LOSS_TYPES
from pipeline.objective.reference import Reference
from pipeline.run.reference_pass import score_block

TOL = dict(rtol=1e-5, atol=1e-5)
PADDED = {"prefix_sharing": False, "packing": False}
LAYOUTS = {
    "prefix_shared": {"prefix_sharing": True, "packing": True},
    "prefix_shared_one_per_row": {"prefix_sharing": True, "packing": False},
    "prefix_shared_padding_free": {"prefix_sharing": True, "packing": False, "padding_free": True},
    "packed": {"prefix_sharing": False, "packing": True},
    "padding_free": {"prefix_sharing": False, "packing": False, "padding_free": True},
}


PAIRS = random_pairs(6, prompt=(1, 8), chosen=(1, 7), rejected=(1, 9), low=7)


def build(tokenizer, seed: int = 0, attn: str = "sdpa", layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def make_trainer(tmp_path, model, tokenizer, ref_model=None, peft_config=None, **options) -> DPOTrainer:
    args = DPOConfig(
        **{
            "output_dir": str(tmp_path),
            "report_to": "none",
            "gradient_checkpointing": False,
            "disable_tqdm": True,
            "save_strategy": "no",
            "per_device_train_batch_size": 4,
            "beta": 0.5,
            **options,
        }
    )
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        peft_config=peft_config,
    )


def step(trainer, train: bool = True, rows=PAIRS):
    """One compute_loss on `rows`: the loss, the metrics it logged and (train) every parameter's gradient."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train(train)
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with contextlib.nullcontext() if train else torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        if train:
            loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), trainer.pop_metrics("train" if train else "eval"), grads


def assert_same(got, want, train: bool = True):
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = got, want
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert grads.keys() == want_grads.keys() and (grads or not train)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


def compare(
    tmp_path, tokenizer, layout: dict, train: bool = True, rows=PAIRS, peft_config=None, attn="sdpa", **options
):
    """The same step in `layout` and padded, each from the same initial weights and reference."""
    results = []
    for opts in (layout, PADDED):
        trainer = make_trainer(
            tmp_path,
            build(tokenizer, attn=attn),
            tokenizer,
            ref_model=None if peft_config else build(tokenizer, seed=1, attn=attn),
            peft_config=peft_config,
            **opts,
            **options,
        )
        assert trainer.data_collator.layout == DataCollatorForPreference(0, **opts).layout
        results.append(
            step(trainer, train, trainer.train_dataset.to_list() if options.get("precompute_ref_log_probs") else rows)
        )
    assert_same(*results, train=train)
    return results


# ---- the collator ---------------------------------------------------------------------------------------


def test_a_prefix_shared_segment_holds_the_prompt_once_and_restarts_positions_for_the_second_completion():
    pair = {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33, 34]}
    batch = DataCollatorForPreference(0, prefix_sharing=True)([pair])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6]]
    assert batch["part_ids"].tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 4]
    # the outputs predicting each sequence's tokens: the rejected's first token follows the prompt's last
    flat = batch["input_ids"].reshape(-1)
    chosen, rejected = batch["packed_index"], batch["label_ids"]
    assert chosen[0, :4].tolist() == [0, 1, 2, 3] and rejected[0, :4].tolist() == [12, 13, 21, 22]
    assert batch["packed_index"][1].tolist() == [0, 1, 2, 5, 6, 7]
    assert batch["label_ids"][1].tolist() == [12, 13, 31, 32, 33, 34]
    assert flat[batch["packed_index"][1][2]] == 13  # the prompt's last token predicts rejected's first
    assert int(batch["num_tokens"]) == 5 + 7  # as the padded batch counts: the prompt with each completion

    mask = allowed(batch["segment_ids"], batch["part_ids"])[0, 0]
    assert mask[5, :3].all() and not mask[5, 3:5].any() and mask[5, 5]  # rejected sees the prompt, not chosen
    assert mask[4, :5].all() and not mask[4, 5:].any()  # chosen: prompt and itself, causally
    assert not mask[1, 2]


def test_packing_fills_rows_up_to_the_longest_segment_without_growing_them():
    assert first_fit([5, 2, 3, 9, 4], 9) == [[3], [0, 4], [2, 1]]
    pairs = [
        {"prompt_ids": [7] * p, "chosen_ids": [8] * c, "rejected_ids": [9] * r}
        for p, c, r in [(6, 3, 4), (2, 1, 1), (2, 2, 2), (3, 1, 2)]
    ]
    shared = DataCollatorForPreference(0, prefix_sharing=True, packing=True)(pairs)
    # segments of 13, 4, 6 and 6 tokens in rows of 13: the longest alone, the two of 6 together, then the 4
    assert shared["input_ids"].shape == (3, 13)
    assert [sorted(set(row) - {-1}) for row in shared["segment_ids"].tolist()] == [[0], [2, 3], [1]]
    padded = DataCollatorForPreference(0)(pairs)
    assert padded["input_ids"].shape == (8, 10) and shared["input_ids"].numel() < padded["input_ids"].numel() / 2
    assert int(shared["num_tokens"]) == int(padded["attention_mask"].sum())


# ---- the same numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layout_gives_the_padded_values_and_gradients(tmp_path, tiny_tokenizer, name, attn):
    compare(tmp_path, tiny_tokenizer, LAYOUTS[name], attn=attn, use_weighting=True, ld_alpha=0.5)
    compare(tmp_path, tiny_tokenizer, LAYOUTS[name], train=False, attn=attn)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_prefix_shared_equals_padded(tmp_path, tiny_tokenizer, loss_type):
    compare(tmp_path, tiny_tokenizer, LAYOUTS["prefix_shared"], loss_type=[loss_type], label_smoothing=0.1)


@pytest.mark.parametrize(
    "options",
    [
        {"precompute_ref_log_probs": True, "ld_alpha": 0.5},
        {"gradient_checkpointing": True},
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        {"pad_to_multiple_of": 8},
    ],
    ids=["precomputed_reference", "gradient_checkpointing", "mpo", "pad_to_multiple_of"],
)
def test_prefix_shared_options_equal_padded(tmp_path, tiny_tokenizer, options):
    compare(tmp_path, tiny_tokenizer, LAYOUTS["prefix_shared"], **options)


def test_a_new_lora_adapter_and_its_adapter_off_reference_prefix_shared(tmp_path, tiny_tokenizer):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    (_, _, grads), _ = compare(tmp_path, tiny_tokenizer, LAYOUTS["prefix_shared"], peft_config=peft_config)
    assert grads and all("lora_" in name for name in grads)


def test_the_reference_pass_prefix_shared_equals_padded(tiny_tokenizer):
    model = build(tiny_tokenizer)
    block = pa.Table.from_pylist([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in PAIRS])
    reference = Reference("explicit", model, "")
    shared = score_block(reference, block, DataCollatorForPreference(0, prefix_sharing=True, packing=True), 4)
    padded = score_block(reference, block, DataCollatorForPreference(0), 4)
    for column in shared.column_names:
        got, want = shared[column].to_pylist(), padded[column].to_pylist()
        torch.testing.assert_close(
            torch.tensor([x for v in got for x in (v if isinstance(v, list) else [v])]),
            torch.tensor([x for v in want for x in (v if isinstance(v, list) else [v])]),
            **TOL,
        )


# ---- the default and the fall-backs ----------------------------------------------------------------------


def test_the_default_layout_is_prefix_shared_and_packed_and_can_be_turned_off(tmp_path, tiny_model, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_model, tiny_tokenizer)
    assert trainer.layout == BatchLayout("prefix_shared", "first_fit")
    assert trainer.layout.options() == {"prefix_sharing": True, "packing": True, "padding_free": False}
    assert "segment_ids" in trainer.data_collator(PAIRS)
    off = make_trainer(tmp_path, tiny_model, tiny_tokenizer, prefix_sharing=False, packing=False)
    assert "attention_mask" in off.data_collator(PAIRS)


def test_a_model_that_cannot_take_the_mask_falls_back_with_one_log_line(tmp_path, tiny_tokenizer, caplog):
    from transformers import LlamaForCausalLM

    class DropsTheMask(LlamaForCausalLM):
        def forward(self, *args, attention_mask=None, logits_to_keep=0, **kwargs):
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            return super().forward(*args, attention_mask=mask, logits_to_keep=logits_to_keep, **kwargs)

    base = build(tiny_tokenizer)
    model = DropsTheMask(base.config)
    model.load_state_dict(base.state_dict())
    # without the mask, the restarting positions split the rejected completion from its prompt
    assert layout_problem(model, "prefix_shared").startswith("its log-probs differ from the padded batch's by")
    assert layout_problem(model, "packed") is None
    with caplog.at_level(logging.WARNING, logger="pipeline.model.layout"):
        trainer = make_trainer(tmp_path, model, tiny_tokenizer, ref_model=build(tiny_tokenizer, seed=1))
    assert trainer.layout == BatchLayout("packed", "first_fit")
    [line] = [r.getMessage() for r in caplog.records if r.name == "pipeline.model.layout"]
    assert line.startswith("DropsTheMask cannot take prefix-shared batches (its log-probs differ")
    assert line.endswith("); using packed batches")
    assert step(trainer)[0] == pytest.approx(
        step(make_trainer(tmp_path, model, tiny_tokenizer, ref_model=build(tiny_tokenizer, seed=1), **PADDED))[0],
        rel=1e-5,
    )


def test_an_attention_implementation_without_custom_masks_is_not_given_one(tiny_tokenizer):
    model = build(tiny_tokenizer)
    model.config._attn_implementation = "flash_attention_2"  # as configured; never run here
    assert "takes no custom mask" in layout_problem(model, "prefix_shared")
    assert batch_layout([model], BatchLayout.of_options(prefix_sharing=True)) == BatchLayout("padded")
    window = build(tiny_tokenizer)
    window.config.sliding_window, window.config.use_sliding_window = 4, True
    assert "sliding-window" in layout_problem(window, "prefix_shared")


@pytest.mark.parametrize(
    "options, kind, rows, fallback",
    [
        ({}, "padded", "each", "padded"),
        ({"packing": True}, "packed", "first_fit", "padded"),
        ({"padding_free": True}, "packed", "one", "padded"),
        ({"prefix_sharing": True, "packing": True}, "prefix_shared", "first_fit", "packed"),
        ({"prefix_sharing": True}, "prefix_shared", "each", "padded"),
        ({"prefix_sharing": True, "padding_free": True}, "prefix_shared", "one", "packed"),
    ],
)
def test_the_batch_layout_is_one_type_from_the_options_to_the_batch(options, kind, rows, fallback):
    layout = BatchLayout.of_options(**options)
    assert (layout.kind, layout.rows, layout.fallback().kind) == (kind, rows, fallback)
    assert BatchLayout.of_options(**layout.options()) == layout
    batch = DataCollatorForPreference(0, **layout.options())(PAIRS)
    assert BatchLayout.of_batch(batch) == kind  # what the head reads off a collated batch
    if kind != "padded":  # rows: several segments, one each, or all in one
        segments = len(PAIRS) * (1 if kind == "prefix_shared" else 2)
        expected = {"one": 1, "each": segments}.get(rows)
        assert batch["input_ids"].shape[0] == expected if expected else batch["input_ids"].shape[0] <= segments


def test_a_layout_problem_is_decided_once_per_model(tiny_tokenizer, monkeypatch):
    model = build(tiny_tokenizer)
    calls = []
    real = pipeline.model.layout._probe
    monkeypatch.setattr(pipeline.model.layout, "_probe", lambda m, layout: calls.append(layout) or real(m, layout))
    for _ in range(3):
        assert layout_problem(model, "prefix_shared") is None
    assert calls == ["prefix_shared"]
