"""Held-out evaluation: the DPO metrics of the policy and of the reference on eval pairs, and greedy generations of
both on held-out prompts, judged into a win rate where a judge exists.

Only a built-in task has a judge, a program that scores the answers: `builtin:sentiment` by the review's adjectives
(`builtin.task.judge`), `builtin:vision-colors` by whether the answer names the picture's dominant colour
(`builtin.vision_task.judge`, which reads the colour off the picture itself)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.builtin import task
from pipeline.config.train_params import dpo_config
from pipeline.core.distributed import barrier, gather_shares, is_main, my_share
from pipeline.data.images import data_uri, image_digests, open_image
from pipeline.data.processing import chat_renderer, tokenizer_of
from pipeline.data.schema import decoded_row
from pipeline.data.sources import is_builtin
from pipeline.data.tables import load_pairs
from pipeline.model.loading import load_base_tokenizer, load_trained_policy
from pipeline.model.logps import sequence_logps
from pipeline.objective.reference import Reference, stage_reference
from pipeline.run.trainer import DPOScorer


@torch.no_grad()
def greedy_answers(model, processing_class, prompts: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of prompts (`{"prompt": messages or text, "images": stored images or None}`), decoded
    without special tokens. Messages are rendered with the chat template, text is tokenized as `tokenize` does a
    standard row's prompt (with the tokenizer's special prefix); prompts with images go through the processor."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer = tokenizer_of(processing_class)
    render = chat_renderer(processing_class).apply_chat_template
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [
                p["prompt"]
                if isinstance(p["prompt"], str)
                else render(p["prompt"], add_generation_prompt=True, tokenize=False)
                for p in chunk
            ]
            images = [open_image(image) for p in chunk for image in p.get("images") or []]
            encode = processing_class if images else tokenizer
            batch = encode(
                text=texts,
                **({"images": images} if images else {}),
                return_tensors="pt",
                padding=True,
                add_special_tokens=isinstance(chunk[0]["prompt"], str),
            ).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def judge_answer(prompt: dict, answer: str) -> float:
    """The built-in judge of an answer to a held-out prompt: the picture task's for a prompt with images."""
    if prompt.get("images"):
        from pipeline.builtin import vision_task

        return vision_task.judge(open_image(prompt["images"][0]), answer)
    return task.judge(prompt["prompt"], answer)


def prompt_text(messages: list[dict] | str) -> str:
    """The last turn of a prompt as text (an image part as "[image]"); a text prompt as it is."""
    if isinstance(messages, str):
        return messages
    content = messages[-1]["content"]
    if isinstance(content, list):
        return " ".join("[image]" if part.get("type") == "image" else part.get("text", "") for part in content)
    return content


def greedy_generations(
    policy, reference: Reference, processing_class, prompts: list[dict], max_new_tokens: int, batch_size: int
) -> list[dict]:
    """The greedy answers of the policy and of the reference to each prompt: `{"prompt", "policy", "reference"}`
    (and the prompt's `images` as data URIs), in the prompts' order.

    The reference generates inside its context (for "adapter_off": the policy with its adapter switched off)."""
    share = my_share(prompts)  # under several processes each answers its share of the prompts
    mine = gather_shares(greedy_answers(policy, processing_class, share, max_new_tokens, batch_size), len(prompts))
    with reference.context():
        theirs = greedy_answers(reference.model, processing_class, share, max_new_tokens, batch_size)
    theirs = gather_shares(theirs, len(prompts))
    return [
        {
            "prompt": prompt_text(p["prompt"]),
            "policy": a,
            "reference": b,
            **({"images": [data_uri(i) for i in p["images"]]} if p.get("images") else {}),
        }
        for p, a, b in zip(prompts, mine, theirs)
    ]


def judge_generations(prompts: list[dict], examples: list[dict]) -> dict:
    """The built-in judge's verdict on `greedy_generations`' examples: each with `policy_score`, `reference_score` and
    `outcome` (1 policy wins, 0.5 tie, 0 reference wins), and the win rate of the policy (ties count half)."""
    scored = []
    for prompt, example in zip(prompts, examples):
        mine, theirs = judge_answer(prompt, example["policy"]), judge_answer(prompt, example["reference"])
        outcome = 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
        scored.append({**example, "policy_score": mine, "reference_score": theirs, "outcome": outcome})
    count = max(1, len(scored))
    return {
        "win_rate": sum(e["outcome"] for e in scored) / count,
        "policy_mean_score": sum(e["policy_score"] for e in scored) / count,
        "reference_mean_score": sum(e["reference_score"] for e in scored) / count,
        "examples": scored,
    }


def held_out_prompts(normalized: Path, limit: int) -> list[dict]:
    """Distinct prompts of the eval split (messages, or text for standard rows; with their images:
    `{"prompt", "images"}`), in file order, at most `limit`."""
    seen, prompts = set(), []
    for record in pq.read_table(Path(normalized) / "eval.parquet").to_pylist():
        row = decoded_row(record)
        key = (record["prompt"], tuple(image_digests(row["images"])))
        if key not in seen and len(prompts) < limit:
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
    """What evaluate found: the policy's metrics (flat names, with the counts `num_pairs` and `num_generations`),
    the reference's own DPO metrics on the same pairs (`EvalScorer.score_reference`), the generations (None when
    evaluate.num_generations is 0: `{"num_generations", "examples"}`, with a judge also `win_rate`,
    `policy_mean_score`, `reference_mean_score`), and every eval pair with its text and rewards."""

    metrics: dict[str, float]
    reference_metrics: dict[str, float]
    generations: dict | None
    pairs: list[dict]


class EvalScorer(DPOScorer):
    """The evaluate stage's scorer: `predict` scores the policy against the reference, `score_reference` the
    reference against itself."""

    _scoring_reference = False

    def score_reference(self, dataset) -> dict[str, float]:
        """The reference's own eval metrics on `dataset`, under the names and arithmetic of the policy's.

        One forward of the reference per batch (as the trainer runs an online reference: its context, its device),
        with the diagnostics, stands in for the policy's; its log-probs serve as both sides of the objective. So
        logps/*, logits/*, entropy and mean_token_accuracy are the reference's; its implicit rewards
        β·log(π_ref/π_ref) are exactly 0, so rewards/accuracies (chosen reward strictly above rejected) is 0, and
        loss is the objective at zero rewards (log 2 for sigmoid). The stored log-probs alone would leave entropy,
        token accuracy and logits unmeasured, and the one forward gives all of them. With Liger the pass takes the
        plain route, so the reference also gets the entropy and token accuracy the fused loss does not compute."""
        liger = self.args.use_liger_kernel
        self._scoring_reference, self.args.use_liger_kernel = True, False
        try:
            loss = self.predict(dataset, metric_key_prefix="eval").metrics["eval_loss"]
        finally:
            self._scoring_reference, self.args.use_liger_kernel = False, liger
        return {"loss": loss, **self.pop_metrics("eval")}

    def _token_values(self, model, inputs: dict, diagnostics: bool):
        if not self._scoring_reference:
            return super()._token_values(model, inputs, diagnostics)
        with self.reference.context():
            per_token, diag = super()._token_values(self.reference.model, inputs, diagnostics)
        self._reference_per_token = per_token
        return per_token, diag

    def _reference_sequence_logps(self, inputs: dict, mask: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        if not self._scoring_reference:
            return super()._reference_sequence_logps(inputs, mask, shared)
        return sequence_logps(self._reference_per_token, mask, self.args.ld_alpha, shared)


def evaluate_policy(
    params: dict, train: Path, tokenized: Path, ref_logps: Path, normalized: Path, base: Path, out_dir: Path
) -> Evaluation:
    """The DPO metrics of the trained policy on the eval split against the run's reference, and the reference's own;
    per-example results (with the pairs' text) in out_dir; greedy generations of both on held-out prompts in
    out_dir/generations.jsonl (unless evaluate.num_generations is 0), judged on a built-in task."""
    cfg = params["evaluate"]
    precomputed = bool(params["train"].get("precompute_ref_log_probs", False))
    eval_set = load_pairs(tokenized, "eval", ref_logps if precomputed else None)
    tokenizer = load_base_tokenizer(base, params)
    judge = is_builtin(params["data"]["train"])
    policy = load_trained_policy(Path(train) / "model", base, params)  # a full model, or the adapter on the base
    # the training run's reference (a new adapter's: the adapter off): its own metrics and generations run it
    reference = stage_reference(base, params, policy, "after_training")
    args = dpo_config(
        params,
        Path(out_dir) / "trainer",
        per_device_eval_batch_size=cfg["batch_size"],
        eval_strategy="no",
        gradient_checkpointing=False,
    )
    trainer = EvalScorer(model=policy, ref_model=reference, args=args, processing_class=tokenizer)
    eval_set = trainer.with_reference_logps(eval_set)  # computed once, when not precomputed
    prediction = trainer.predict(eval_set, metric_key_prefix="eval")
    metrics = {"loss": prediction.metrics["eval_loss"], **trainer.pop_metrics("eval"), "num_pairs": len(eval_set)}
    reference_metrics = trainer.score_reference(eval_set)
    rewards = prediction.predictions
    row_ids = list(eval_set["row_id"])
    texts = pair_texts(normalized, row_ids)
    pairs = [
        {
            "row_id": row_id,
            **texts.get(row_id, {"prompt": "", "chosen": "", "rejected": ""}),
            "chosen_reward": float(c),
            "rejected_reward": float(r),
            "margin": float(c - r),
        }
        for row_id, c, r in zip(row_ids, rewards[:, 0], rewards[:, 1])
    ]
    per_example = pa.Table.from_pylist([{**p, "correct": p["chosen_reward"] > p["rejected_reward"]} for p in pairs])
    if is_main():
        pq.write_table(per_example, Path(out_dir) / "per_example.parquet")
    generated = None
    prompts = held_out_prompts(normalized, cfg["num_generations"])
    if prompts:
        if reference.standalone is not None:
            reference.standalone.to(trainer.model.device)
        examples = greedy_generations(
            trainer.model, reference, tokenizer, prompts, cfg["max_new_tokens"], cfg["batch_size"]
        )
        generated = judge_generations(prompts, examples) if judge else {"examples": examples}
        generated["num_generations"] = metrics["num_generations"] = len(prompts)
        metrics.update({k: generated[k] for k in ("win_rate", "policy_mean_score", "reference_mean_score") if judge})
        if is_main():
            lines = "".join(json.dumps(e) + "\n" for e in generated["examples"])
            (Path(out_dir) / "generations.jsonl").write_text(lines)
    barrier()
    if is_main():
        shutil.rmtree(Path(out_dir) / "trainer", ignore_errors=True)
    return Evaluation(metrics, reference_metrics, generated, pairs)
