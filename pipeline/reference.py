"""Reference log-probs: one no-grad pass of the reference model over tokenized pairs, by `row_id`."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .collator import DataCollatorForPreference
from .logps import token_logps


@torch.no_grad()
def reference_logps(model: torch.nn.Module, rows: list[dict], collator: DataCollatorForPreference,
                    batch_size: int, reference_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    progress: bool = False) -> dict[str, list]:
    """Summed and per-token completion log-probs of chosen and rejected under `model`.

    `rows` hold `row_id`, `prompt_ids`, `chosen_ids`, `rejected_ids`. Rows are batched by length so
    little compute goes to padding; results come back in the input order. `reference_context` wraps
    the forward pass (for a PEFT policy: the adapter disabled).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + max(len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])))
    results: dict[int, tuple] = {}
    batches: Iterable = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="reference log-probs", disable=not progress):
        index = order[start:start + batch_size]
        batch = collator([rows[i] for i in index])
        with reference_context():
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits[:, :-1]
        labels = batch["input_ids"][:, 1:].to(device)
        mask = batch["completion_mask"][:, 1:].to(device).bool()
        per_token = token_logps(logits, labels)
        n = len(index)
        for j, i in enumerate(index):
            chosen = per_token[j][mask[j]].tolist()
            rejected = per_token[n + j][mask[n + j]].tolist()
            results[i] = (sum(chosen), sum(rejected), chosen, rejected)
    if was_training:
        model.train()
    ordered = [results[i] for i in range(len(rows))]
    return {"row_id": [r["row_id"] for r in rows],
            "ref_chosen_logps": [r[0] for r in ordered], "ref_rejected_logps": [r[1] for r in ordered],
            "ref_chosen_token_logps": [r[2] for r in ordered], "ref_rejected_token_logps": [r[3] for r in ordered]}
