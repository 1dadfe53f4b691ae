"""The built-in base model: a tiny chat model warm-started by a short supervised pass.

The warm start mostly pans and sometimes praises (`warmup_positive_fraction`), so the reference can
produce both behaviours but prefers the dispreferred one: the room DPO has to improve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.builtin import BUILTIN_MODEL, task
from pipeline.builtin.model import build_model
from pipeline.builtin.tokenizer import build_tokenizer
from pipeline.data.tokenize import tokenize_pair
from pipeline.model.collator import DataCollatorForPreference
from pipeline.model.logps import token_logps
from pipeline.store.base_record import MODEL_SUBDIR


def supervised_pass(
    model,
    num_rows: int,
    completion_nll: Callable[[list[int]], torch.Tensor],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> list[float]:
    """`steps` AdamW steps (learning rate decaying linearly to 0) on batches of `batch_size` row indices drawn with
    replacement from `num_rows`; `completion_nll(indices)` is the batch's mean negative log-likelihood of the
    completion tokens. Returns the loss of each step; the model is left in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for _ in range(steps):
        loss = completion_nll(torch.randint(num_rows, (batch_size,), generator=generator).tolist())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    model.eval()
    return history


def warm_start(
    model, tokenizer, examples: list[dict], steps: int, batch_size: int, learning_rate: float, seed: int
) -> list[float]:
    """A short supervised pass on prompt→completion examples (loss on completion tokens only)."""
    rows = []
    for ex in examples:
        ids = tokenize_pair(
            tokenizer,
            {
                "conversational": True,
                "prompt": ex["prompt"],
                "chosen": ex["completion"],
                "rejected": ex["completion"],
                "tools": None,
                "chat_template_kwargs": None,
            },
        )
        rows.append(ids)
    collate = DataCollatorForPreference(tokenizer.pad_token_id)

    def completion_nll(index: list[int]) -> torch.Tensor:
        batch = collate([rows[i] for i in index])
        n = len(index)  # the collator stacks chosen and rejected: here both are the completion
        ids, attention, mask = (
            batch["input_ids"][:n],
            batch["attention_mask"][:n],
            batch["completion_mask"][:n, 1:].bool(),
        )
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        return -(token_logps(logits, ids[:, 1:]) * mask).sum() / mask.sum()

    return supervised_pass(model, len(rows), completion_nll, steps, batch_size, learning_rate, seed)


def build_builtin_base(params: dict, out_dir: Path) -> dict:
    """Build the tiny built-in model and tokenizer, warm-start the model, and save both under out_dir/model."""
    cfg, seed = params["model"]["builtin"], params["seed"]
    tokenizer = build_tokenizer()
    model = build_model(
        tokenizer, seed=seed, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"], num_heads=cfg["num_heads"]
    )
    train_prompts, _ = task.split_prompts(seed, params["data"]["eval_fraction"])
    examples = task.warmup_examples(
        train_prompts,
        cfg["warmup_steps"] * cfg["warmup_batch_size"] // 4 + 1,
        cfg["warmup_positive_fraction"],
        seed=seed + 3,
    )
    history = warm_start(
        model, tokenizer, examples, cfg["warmup_steps"], cfg["warmup_batch_size"], cfg["warmup_learning_rate"], seed
    )
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)
    return {
        "source": BUILTIN_MODEL,
        "revision": None,
        "warmup_loss_first": history[0],
        "warmup_loss_last": history[-1],
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
