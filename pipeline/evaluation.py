"""Held-out evaluation: the DPO metrics on eval pairs, and a judged win rate from greedy generations.

On a built-in task a program judges the answers: `builtin:sentiment` by the review's adjectives
(`builtin.task.judge`), `builtin:vision-colors` by whether the answer names the picture's dominant colour
(`builtin.vision_task.judge`, which reads the colour off the picture itself)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .builtin import task
from .data.images import data_uri, image_digests, open_image
from .data.schema import decoded_row
from .data.sources import is_builtin
from .data.tables import load_pairs
from .distributed import barrier, gather_shares, is_main, my_share
from .models import load_base_tokenizer, load_trained_policy
from .params import dpo_config
from .processing import chat_renderer, tokenizer_of
from .reference import Reference, stage_reference
from .trainer import DPOTrainer


@torch.no_grad()
def greedy_answers(model, processing_class, prompts: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of conversational prompts (`{"prompt": messages, "images": stored images or None}`),
    decoded without special tokens; prompts with images go through the processor with their images."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer = tokenizer_of(processing_class)
    render = chat_renderer(processing_class).apply_chat_template
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [render(p["prompt"], add_generation_prompt=True, tokenize=False) for p in chunk]
            images = [open_image(image) for p in chunk for image in p.get("images") or []]
            encode = processing_class if images else tokenizer
            batch = encode(text=texts, **({"images": images} if images else {}), return_tensors="pt", padding=True,
                           add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def judge_answer(prompt: dict, answer: str) -> float:
    """The built-in judge of an answer to a held-out prompt: the picture task's for a prompt with images."""
    if prompt.get("images"):
        from .builtin import vision_task
        return vision_task.judge(open_image(prompt["images"][0]), answer)
    return task.judge(prompt["prompt"], answer)


def prompt_text(messages: list[dict]) -> str:
    """The last turn of a prompt as text (an image part as "[image]")."""
    content = messages[-1]["content"]
    if isinstance(content, list):
        return " ".join("[image]" if part.get("type") == "image" else part.get("text", "") for part in content)
    return content


def judged_win_rate(policy, reference: Reference, processing_class, prompts: list[dict], max_new_tokens: int,
                    batch_size: int) -> dict:
    """Win rate of the policy over the reference under the built-in task's judge (ties count half).

    The reference generates inside its context (for "adapter_off": the policy with its adapter switched off)."""
    share = my_share(prompts)  # under several processes each answers its share of the prompts
    mine = gather_shares(greedy_answers(policy, processing_class, share, max_new_tokens, batch_size), len(prompts))
    with reference.context():
        theirs = greedy_answers(reference.model, processing_class, share, max_new_tokens, batch_size)
    theirs = gather_shares(theirs, len(prompts))
    scores = [(judge_answer(p, a), judge_answer(p, b)) for p, a, b in zip(prompts, mine, theirs)]
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in scores]
    rate = sum(outcomes) / max(1, len(outcomes))
    examples = [{"prompt": prompt_text(p["prompt"]), "policy": a, "reference": b, "policy_score": sa,
                 "reference_score": sb, "outcome": o, **({"images": [data_uri(i) for i in p["images"]]} if p.get("images") else {})}
                for p, a, b, (sa, sb), o in zip(prompts, mine, theirs, scores, outcomes)]
    return {"win_rate": rate,
            "policy_mean_score": sum(e["policy_score"] for e in examples) / max(1, len(examples)),
            "reference_mean_score": sum(e["reference_score"] for e in examples) / max(1, len(examples)),
            "examples": examples}


def held_out_prompts(normalized: Path, limit: int) -> list[dict]:
    """Distinct conversational prompts of the eval split (with their images: `{"prompt", "images"}`), in file
    order, at most `limit`."""
    seen, prompts = set(), []
    for record in pq.read_table(Path(normalized) / "eval.parquet").to_pylist():
        row = decoded_row(record)
        key = (record["prompt"], tuple(image_digests(row["images"])))
        if record["conversational"] and key not in seen and len(prompts) < limit:
            seen.add(key)
            prompts.append({"prompt": row["prompt"], "images": row["images"]})
    return prompts


def as_text(value) -> str:
    """A prompt or completion as plain text: a string as is, messages as `role: content` lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '?')}: {_content(m.get('content'))}" for m in value or [])


def _content(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image") for p in content):
        return " ".join("[image]" if p["type"] == "image" else p.get("text", "") for p in content)
    return json.dumps(content)


def pair_texts(normalized: Path, row_ids: list[str]) -> dict[str, dict[str, str]]:
    """row_id → {prompt, chosen, rejected} as text, from the normalized eval split."""
    wanted = set(row_ids)
    texts = {}
    for record in pq.read_table(Path(normalized) / "eval.parquet").to_pylist():
        if record["row_id"] in wanted:
            row = decoded_row(record)
            texts[row["row_id"]] = {k: as_text(row[k]) for k in ("prompt", "chosen", "rejected")}
    return texts


@dataclasses.dataclass
class Evaluation:
    """What evaluate found: the policy's metrics (flat names), the reference's where they are defined, the judged
    generations (built-in task only), and every eval pair with its text and rewards."""

    metrics: dict[str, float]
    reference_metrics: dict[str, float]
    judged: dict | None
    pairs: list[dict]


def evaluate_policy(params: dict, train: Path, tokenized: Path, ref_logps: Path, normalized: Path, base: Path,
                    out_dir: Path) -> Evaluation:
    """The DPO metrics of the trained policy on the eval split against the run's reference, per-example
    results (with the pairs' text) in out_dir, and on the built-in task the judged win rate of greedy generations."""
    cfg = params["evaluate"]
    precomputed = bool(params["train"].get("precompute_ref_log_probs", False))
    eval_set = load_pairs(tokenized, "eval", ref_logps if precomputed else None)
    tokenizer = load_base_tokenizer(base, params)
    judge = is_builtin(params["data"]["train"])
    policy = load_trained_policy(Path(train) / "model", base, params)  # a full model, or the adapter on the base
    # the training run's reference, loaded only when something runs it (a new adapter's: the adapter off)
    reference = stage_reference(base, params, policy, "after_training", precomputed=precomputed and not judge)
    args = dpo_config(params, Path(out_dir) / "trainer", per_device_eval_batch_size=cfg["batch_size"],
                      eval_strategy="no", gradient_checkpointing=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer)
    eval_set = trainer.with_reference_logps(eval_set)  # the reference's own log-probs, for the report
    prediction = trainer.predict(eval_set, metric_key_prefix="eval")
    metrics = {"loss": prediction.metrics["eval_loss"], **trainer.pop_metrics("eval"), "num_pairs": len(eval_set)}
    reference_metrics = {"logps/chosen": float(np.mean(eval_set["ref_chosen_logps"])),
                         "logps/rejected": float(np.mean(eval_set["ref_rejected_logps"]))}
    rewards = prediction.predictions
    row_ids = list(eval_set["row_id"])
    texts = pair_texts(normalized, row_ids)
    pairs = [{"row_id": row_id, **texts.get(row_id, {"prompt": "", "chosen": "", "rejected": ""}),
              "chosen_reward": float(c), "rejected_reward": float(r), "margin": float(c - r)}
             for row_id, c, r in zip(row_ids, rewards[:, 0], rewards[:, 1])]
    per_example = pa.Table.from_pylist([{**p, "correct": p["chosen_reward"] > p["rejected_reward"]} for p in pairs])
    if is_main():
        pq.write_table(per_example, Path(out_dir) / "per_example.parquet")
    judged = None
    if judge:
        prompts = held_out_prompts(normalized, cfg["num_generations"])
        if reference.standalone is not None:
            reference.standalone.to(trainer.model.device)
        judged = judged_win_rate(trainer.model, reference, tokenizer, prompts, cfg["max_new_tokens"], cfg["batch_size"])
        judged["num_generations"] = len(prompts)
        metrics.update({k: judged[k] for k in ("win_rate", "policy_mean_score", "reference_mean_score")})
        metrics["num_generations"] = len(prompts)
        reference_metrics["policy_mean_score"] = judged["reference_mean_score"]
        if is_main():
            (Path(out_dir) / "generations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in judged["examples"]))
    barrier()
    if is_main():
        shutil.rmtree(Path(out_dir) / "trainer", ignore_errors=True)
    return Evaluation(metrics, reference_metrics, judged, pairs)
