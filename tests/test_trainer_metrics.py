"""The sigmoid loss and every logged metric, against values computed plainly in the test."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import DPOConfig, DPOTrainer

PAIRS = [  # token ids of the built-in vocabulary; completions of different lengths
    {"row_id": "a", "prompt_ids": [2, 5, 40, 41], "chosen_ids": [50, 51, 3], "rejected_ids": [60, 3]},
    {"row_id": "b", "prompt_ids": [2, 5, 42], "chosen_ids": [52, 3], "rejected_ids": [61, 62, 63, 3]},
]
REF = {"a": (-9.0, -7.5), "b": (-6.0, -11.0)}
BETA = 0.3


def plain_stats(model, prompt, completion):
    """Per completion token: log p(token), vocabulary-mean logit, entropy, argmax hit — one by one."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    out = []
    for t in range(len(prompt), len(prompt) + len(completion)):
        row = logits[t - 1]
        probs = torch.softmax(row, -1)
        out.append(
            {
                "logp": math.log(probs[ids[0, t]].item()),
                "mean_logit": row.mean().item(),
                "entropy": -(probs * probs.log()).sum().item(),
                "hit": float(row.argmax().item() == ids[0, t].item()),
            }
        )
    return out


def test_sigmoid_loss_and_every_metric_match_a_plain_computation(tmp_path, tiny_model, tiny_tokenizer):
    import datasets

    rows = [
        dict(
            p,
            ref_chosen_logps=REF[p["row_id"]][0],
            ref_rejected_logps=REF[p["row_id"]][1],
            ref_chosen_token_logps=[0.0] * len(p["chosen_ids"]),
            ref_rejected_token_logps=[0.0] * len(p["rejected_ids"]),
        )
        for p in PAIRS
    ]
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=BETA,
        precompute_ref_log_probs=True,
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=tiny_model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tiny_tokenizer
    )
    batch = trainer.data_collator(rows)
    tiny_model.train()
    loss = trainer.compute_loss(tiny_model, batch)
    metrics = trainer.pop_metrics("train")

    losses, rc, rr, lc, lr = [], [], [], [], []
    chosen_tokens, rejected_tokens = [], []
    for p in PAIRS:
        c = plain_stats(tiny_model, p["prompt_ids"], p["chosen_ids"])
        r = plain_stats(tiny_model, p["prompt_ids"], p["rejected_ids"])
        chosen_tokens += c
        rejected_tokens += r
        c_sum, r_sum = sum(t["logp"] for t in c), sum(t["logp"] for t in r)
        ref_c, ref_r = REF[p["row_id"]]
        z = BETA * ((c_sum - ref_c) - (r_sum - ref_r))
        losses.append(-math.log(1 / (1 + math.exp(-z))))
        rc.append(BETA * (c_sum - ref_c))
        rr.append(BETA * (r_sum - ref_r))
        lc.append(c_sum)
        lr.append(r_sum)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert loss.item() == pytest.approx(mean(losses), rel=1e-5)
    expected = {
        "rewards/chosen": mean(rc),
        "rewards/rejected": mean(rr),
        "rewards/margins": mean([a - b for a, b in zip(rc, rr)]),
        "rewards/accuracies": mean([float(a > b) for a, b in zip(rc, rr)]),
        "logps/chosen": mean(lc),
        "logps/rejected": mean(lr),
        "logits/chosen": mean([t["mean_logit"] for t in chosen_tokens]),
        "logits/rejected": mean([t["mean_logit"] for t in rejected_tokens]),
        "entropy": mean([t["entropy"] for t in chosen_tokens + rejected_tokens]),
        "mean_token_accuracy": mean([t["hit"] for t in chosen_tokens]),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_metrics_are_token_weighted_over_the_logging_interval(tmp_path, tiny_model, tiny_tokenizer):
    """Two batches with different token counts: entropy is the ratio of sums, not the mean of means."""
    import datasets

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False, disable_tqdm=True)
    trainer = DPOTrainer(
        model=tiny_model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tiny_tokenizer
    )
    tiny_model.eval()
    per_batch = []
    for pair in PAIRS:
        trainer.compute_loss(tiny_model, trainer.data_collator([pair]))
        per_batch.append(trainer.pop_metrics("eval"))
    for pair in PAIRS:
        trainer.compute_loss(tiny_model, trainer.data_collator([pair]))
    both = trainer.pop_metrics("eval")
    tokens = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in PAIRS]
    weighted = sum(m["entropy"] * n for m, n in zip(per_batch, tokens)) / sum(tokens)
    assert both["entropy"] == pytest.approx(weighted, rel=1e-5)
    assert both["entropy"] != pytest.approx((per_batch[0]["entropy"] + per_batch[1]["entropy"]) / 2, rel=1e-6)


def test_trainer_logs_carry_the_documented_names(tmp_path, tiny_model, tiny_tokenizer):
    import datasets

    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        gradient_checkpointing=False,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        disable_tqdm=True,
        eval_strategy="steps",
        eval_steps=2,
        learning_rate=1e-3,
    )
    dataset = datasets.Dataset.from_list(PAIRS)
    trainer = DPOTrainer(
        model=tiny_model, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tiny_tokenizer
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "rewards/chosen" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    names = {
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "global_step",
        "num_tokens",
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
    }
    assert names <= set(train_logs[0])
    assert {f"eval_{n}" for n in ("rewards/accuracies", "logps/chosen", "entropy", "mean_token_accuracy")} <= set(
        eval_logs[0]
    )
    total = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in PAIRS)
    assert train_logs[-1]["num_tokens"] == total * 2  # two steps over the same two pairs
