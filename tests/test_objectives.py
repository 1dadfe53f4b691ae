"""Every objective, transform and option of the trainer on a tiny model (issue: every DPO objective)."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch

from pipeline import DPOConfig, DPOTrainer
from pipeline.model.collator import DataCollatorForPreference
from pipeline.model.logps import token_diagnostics, wpo_log_weights
from pipeline.objective.losses import LOSS_TYPES

PAIRS = [
    {"row_id": "a", "prompt_ids": [2, 5, 40, 41], "chosen_ids": [50, 51, 3], "rejected_ids": [60, 3]},
    {"row_id": "b", "prompt_ids": [2, 5, 42], "chosen_ids": [52, 3], "rejected_ids": [61, 62, 63, 3]},
    {"row_id": "c", "prompt_ids": [2, 6, 43, 44, 45], "chosen_ids": [53, 54, 55, 56, 3], "rejected_ids": [64, 3]},
    {"row_id": "d", "prompt_ids": [2, 6], "chosen_ids": [57, 3], "rejected_ids": [65, 66, 3]},
]
METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
}
OPTIONS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


def config(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-3,
        max_steps=3,
    )
    return DPOConfig(**{**base, **kwargs})


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_each_loss_type_trains_with_finite_loss_and_documented_metrics(tmp_path, tiny_model, tiny_tokenizer, loss_type):
    args = config(tmp_path, loss_type=[loss_type], **OPTIONS.get(loss_type, {}))
    trainer = DPOTrainer(
        model=tiny_model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tiny_tokenizer
    )
    before = copy.deepcopy(tiny_model.state_dict())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert METRICS <= set(logs[0])
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_mpo_combination_from_the_reference_docs_is_the_weighted_sum(tmp_path, tiny_model, tiny_tokenizer):
    dataset = datasets.Dataset.from_list(PAIRS)
    values = {}
    for types, weights in (
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
        (["sigmoid"], None),
        (["bco_pair"], None),
        (["sft"], None),
    ):
        trainer = DPOTrainer(
            model=tiny_model,
            ref_model=copy.deepcopy(tiny_model),
            args=config(tmp_path, loss_type=types, loss_weights=weights),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        tiny_model.train()
        values[types[0] if len(types) == 1 else "mpo"] = trainer.compute_loss(
            tiny_model, trainer.data_collator(PAIRS)
        ).item()
    assert values["mpo"] == pytest.approx(0.8 * values["sigmoid"] + 0.2 * values["bco_pair"] + values["sft"], rel=1e-5)


def eval_metrics(trainer, model, rows):
    model.eval()
    loss = trainer.compute_loss(model, trainer.data_collator(rows)).item()
    return loss, trainer.pop_metrics("eval")


def test_padding_free_batches_give_the_padded_results(tmp_path, tiny_model, tiny_tokenizer):
    dataset = datasets.Dataset.from_list(PAIRS)
    results = []
    for padding_free in (False, True):
        trainer = DPOTrainer(
            model=tiny_model,
            args=config(
                tmp_path,
                padding_free=padding_free,
                ld_alpha=0.5,
                use_weighting=True,
                prefix_sharing=False,
                packing=False,
            ),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        batch = trainer.data_collator(PAIRS)
        assert ("attention_mask" in batch) != padding_free
        results.append(eval_metrics(trainer, tiny_model, PAIRS))
    (loss_a, m_a), (loss_b, m_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for name in m_a:
        assert m_a[name] == pytest.approx(m_b[name], rel=1e-4, abs=1e-5), name


def test_ld_alpha_with_precomputed_per_token_reference_equals_the_online_reference(
    tmp_path, tiny_model, tiny_tokenizer
):
    dataset = datasets.Dataset.from_list(PAIRS)
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():  # make policy and reference differ so ld_alpha matters
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    online = DPOTrainer(
        model=tiny_model,
        ref_model=reference,
        args=config(tmp_path, ld_alpha=0.3),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    pre = DPOTrainer(
        model=reference,
        args=config(tmp_path, ld_alpha=0.3, precompute_ref_log_probs=True),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    rows = pre.train_dataset.to_list()
    online_loss, online_metrics = eval_metrics(online, tiny_model, PAIRS)
    pre_loss, pre_metrics = eval_metrics(pre, tiny_model, rows)  # the same policy, scored against stored per-token refs
    assert online_loss == pytest.approx(pre_loss, rel=1e-5)
    assert online_metrics["rewards/margins"] == pytest.approx(pre_metrics["rewards/margins"], rel=1e-4)
    plain = DPOTrainer(
        model=tiny_model,
        ref_model=reference,
        args=config(tmp_path),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert eval_metrics(plain, tiny_model, PAIRS)[0] != pytest.approx(online_loss, rel=1e-6)


def test_ld_alpha_sums_weight_tokens_past_the_shorter_completion(tmp_path, tiny_model, tiny_tokenizer):
    """logps/chosen under ld_alpha equals the hand-weighted sum of per-token log-probs."""
    pair = PAIRS[2]  # chosen 5 tokens, rejected 2: tokens 3..5 of chosen get weight α
    trainer = DPOTrainer(
        model=tiny_model,
        args=config(tmp_path, ld_alpha=0.25),
        train_dataset=datasets.Dataset.from_list([pair]),
        processing_class=tiny_tokenizer,
    )
    _, metrics = eval_metrics(trainer, tiny_model, [pair])
    ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(input_ids=ids).logits[0, :-1].double(), -1)
    start = len(pair["prompt_ids"])
    token = [logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])]
    assert metrics["logps/chosen"] == pytest.approx(sum(token[:2]) + 0.25 * sum(token[2:]), rel=1e-5)


def test_wpo_weights_match_the_formula_and_scale_each_pair(tmp_path, tiny_model, tiny_tokenizer):
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, 6, 5, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    got = wpo_log_weights(token_diagnostics(logits, labels), mask)
    for row in range(2):
        terms = []
        for t in range(4):
            if mask[row, t]:
                p = torch.softmax(logits[row, t], -1)
                terms.append(math.log(p[labels[row, t]].item()) - math.log((p**2).sum().item()))
        assert got[row].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    dataset = datasets.Dataset.from_list(PAIRS)
    reference = copy.deepcopy(tiny_model)
    weighted = DPOTrainer(
        model=tiny_model,
        ref_model=reference,
        args=config(tmp_path, use_weighting=True),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    plain = DPOTrainer(
        model=tiny_model,
        ref_model=reference,
        args=config(tmp_path),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    tiny_model.eval()
    batch = plain.data_collator(PAIRS[:1])
    ratio = weighted.compute_loss(tiny_model, batch).item() / plain.compute_loss(tiny_model, batch).item()
    batch = DataCollatorForPreference(tiny_tokenizer.pad_token_id)(PAIRS[:1])  # padded, for the plain formula
    ids = batch["input_ids"]
    with torch.no_grad():
        diag = token_diagnostics(
            tiny_model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1], ids[:, 1:]
        )
    log_w = wpo_log_weights(diag, batch["completion_mask"][:, 1:].bool())
    assert ratio == pytest.approx(math.exp(log_w.sum().item()), rel=1e-4)


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path, tiny_model, tiny_tokenizer):
    reference = copy.deepcopy(tiny_model)
    start_ref = copy.deepcopy(reference.state_dict())
    args = config(
        tmp_path,
        sync_ref_model=True,
        ref_model_sync_steps=2,
        ref_model_mixup_alpha=0.6,
        max_steps=2,
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(
        model=tiny_model,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    policy = tiny_model.state_dict()
    for name, value in trainer.ref_model.state_dict().items():
        assert torch.allclose(value, 0.6 * policy[name] + 0.4 * start_ref[name], atol=1e-6), name


def test_activation_offloading_gives_the_same_loss(tmp_path, tiny_model, tiny_tokenizer):
    dataset = datasets.Dataset.from_list(PAIRS)
    reference = copy.deepcopy(tiny_model)
    losses = []
    for offload in (False, True):
        trainer = DPOTrainer(
            model=tiny_model,
            ref_model=reference,
            args=config(tmp_path, activation_offloading=offload),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        tiny_model.train()
        loss = trainer.compute_loss(tiny_model, trainer.data_collator(PAIRS))
        loss.backward()
        losses.append((loss.item(), next(tiny_model.parameters()).grad.clone()))
        tiny_model.zero_grad()
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


def test_documented_defaults():
    args = DPOConfig(output_dir="unused")
    assert (args.beta, args.loss_type, args.label_smoothing, args.f_divergence_type, args.f_alpha_divergence_coef) == (
        0.1,
        ["sigmoid"],
        0.0,
        "reverse_kl",
        0.5,
    )
    assert (args.learning_rate, args.logging_steps, args.gradient_checkpointing, args.max_length) == (
        1e-6,
        10,
        True,
        1024,
    )
    assert (args.truncation_mode, args.disable_dropout, args.use_weighting, args.ld_alpha, args.discopop_tau) == (
        "keep_start",
        True,
        False,
        None,
        0.05,
    )
    assert (args.sync_ref_model, args.ref_model_mixup_alpha, args.ref_model_sync_steps) == (False, 0.6, 512)
    assert (args.precompute_ref_log_probs, args.padding_free, args.activation_offloading, args.use_liger_kernel) == (
        False,
        False,
        False,
        False,
    )
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert DPOConfig(output_dir="unused", loss_type="ipo").loss_type == ["ipo"]
