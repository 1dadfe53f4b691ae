"""The built-in vision-language base's warm start: a short supervised pass on image+prompt→completion examples.

It mostly names each picture's confusion colour (`warmup_positive_fraction` of the time the right one), so the
reference can say both but usually says the wrong one: the room DPO has to improve.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaProcessor

from pipeline.builtin import BUILTIN_VLM, vision_task
from pipeline.builtin.vision_model import build_vision_model, build_vision_processor
from pipeline.run.warm_start import supervised_pass
from pipeline.store.base_record import MODEL_SUBDIR


def encode_example(processor: LlavaProcessor, example: dict) -> dict:
    """One prompt→completion row as model inputs: input_ids, pixel_values, and the completion's mask."""
    prompt = processor.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    prompt_len = processor(text=[prompt], images=example["images"], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[full], images=example["images"], return_tensors="pt")
    ids = inputs["input_ids"][0]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[prompt_len:] = True
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"], "completion_mask": mask}


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch of `encode_example` rows."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    completion = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], attention[i, :n], completion[i, :n] = r["input_ids"], 1, r["completion_mask"]
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
    }


def warm_start_vision(
    model, processor, examples: list[dict], steps: int, batch_size: int, learning_rate: float, seed: int
) -> list[float]:
    """A short supervised pass on image+prompt→completion examples (loss on completion tokens only)."""
    rows = [encode_example(processor, ex) for ex in examples]

    def completion_nll(index: list[int]) -> torch.Tensor:
        batch = collate([rows[i] for i in index], processor.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]
        logits = model(
            input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], use_cache=False
        ).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return -(logps * mask).sum() / mask.sum()

    return supervised_pass(model, len(rows), completion_nll, steps, batch_size, learning_rate, seed)


def build_builtin_vision_base(params: dict, out_dir: Path) -> dict:
    """Build the tiny built-in Llava and its processor, warm-start the model, and save both under out_dir/model."""
    cfg, seed = params["model"]["builtin"], params["seed"]
    processor = build_vision_processor()
    model = build_vision_model(
        processor, seed=seed, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"], num_heads=cfg["num_heads"]
    )
    examples = vision_task.warmup_examples(
        cfg["warmup_steps"] * cfg["warmup_batch_size"] // 4 + 1, cfg["warmup_positive_fraction"], seed=seed + 3
    )
    history = warm_start_vision(
        model, processor, examples, cfg["warmup_steps"], cfg["warmup_batch_size"], cfg["warmup_learning_rate"], seed
    )
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    processor.save_pretrained(out_dir / MODEL_SUBDIR)
    return {
        "source": BUILTIN_VLM,
        "revision": None,
        "warmup_loss_first": history[0],
        "warmup_loss_last": history[-1],
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
