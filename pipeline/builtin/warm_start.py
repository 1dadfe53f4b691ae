"""The built-in base model: a tiny chat model warm-started by a short supervised pass (a plain `Trainer` run).

The warm start mostly pans and sometimes praises (`warmup_positive_fraction`), so the reference can
produce both behaviours but prefers the dispreferred one: the room DPO has to improve.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import datasets
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from . import BUILTIN_MODEL, task
from .model import build_model
from .tokenizer import build_tokenizer

MODEL_SUBDIR = "model"
IGNORE_INDEX = -100  # label of the prompt tokens: the loss is on the completion only


def supervised_example(tokenizer, example: dict) -> dict:
    """input_ids of prompt + completion as the chat template renders them; labels only on the completion."""
    prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if input_ids[:len(prompt_ids)] != prompt_ids:
        raise RuntimeError("internal error: the built-in chat template does not extend the prompt")
    return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]}


def warm_start(model, tokenizer, examples: list[dict], steps: int, batch_size: int, learning_rate: float,
               seed: int) -> list[float]:
    """`steps` optimizer steps of supervised fine-tuning (AdamW, linear decay); returns the logged losses."""
    dataset = datasets.Dataset.from_list([supervised_example(tokenizer, e) for e in examples])
    with tempfile.TemporaryDirectory(prefix="dpo-warm-start-") as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=learning_rate, lr_scheduler_type="linear", weight_decay=0.01,
                                 logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", seed=seed,
                                 data_seed=seed, disable_tqdm=True, use_cpu=not _cuda(), dataloader_pin_memory=False)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
    model.eval()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def build_builtin_base(params: dict, out_dir: Path) -> dict:
    """Build the tiny built-in model and tokenizer, warm-start the model, and save both under out_dir/model."""
    cfg, seed = params["model"]["builtin"], params["seed"]
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                        num_heads=cfg["num_heads"])
    train_prompts, _ = task.split_prompts(seed, params["data"]["eval_fraction"])
    examples = task.warmup_examples(train_prompts, cfg["warmup_steps"] * cfg["warmup_batch_size"] // 4 + 1,
                                    cfg["warmup_positive_fraction"], seed=seed + 3)
    history = warm_start(model, tokenizer, examples, cfg["warmup_steps"], cfg["warmup_batch_size"],
                         cfg["warmup_learning_rate"], seed)
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)
    return {"source": BUILTIN_MODEL, "revision": None, "warmup_loss_first": history[0], "warmup_loss_last": history[-1],
            "num_parameters": sum(p.numel() for p in model.parameters())}
