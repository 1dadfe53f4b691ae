"""Held-out evaluation: the DPO metrics on eval pairs, and a judged win rate from greedy generations."""

from __future__ import annotations

import contextlib

import torch

from .builtin import task


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of conversational prompts, decoded without special tokens."""
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def judged_win_rate(policy, reference, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                    reference_context=contextlib.nullcontext) -> dict:
    """Win rate of the policy over the reference under the built-in task's judge (ties count half).

    The reference generates inside `reference_context()` (a PEFT policy's adapter switched off, where the
    reference is the policy without it)."""
    mine = greedy_answers(policy, tokenizer, prompts, max_new_tokens, batch_size)
    with reference_context():
        theirs = greedy_answers(reference, tokenizer, prompts, max_new_tokens, batch_size)
    rate, outcomes = task.win_rate(prompts, mine, theirs)
    examples = [{"prompt": p[-1]["content"], "policy": a, "reference": b, "policy_score": task.judge(p, a),
                 "reference_score": task.judge(p, b), "outcome": o} for p, a, b, o in zip(prompts, mine, theirs, outcomes)]
    return {"win_rate": rate,
            "policy_mean_score": sum(e["policy_score"] for e in examples) / max(1, len(examples)),
            "reference_mean_score": sum(e["reference_score"] for e in examples) / max(1, len(examples)),
            "examples": examples}
