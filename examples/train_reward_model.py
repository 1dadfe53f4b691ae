"""Train a small reward model on the built-in task's preference pairs, for the evaluate stage's `reward_model` judge.

The built-in task (pipeline/builtin/task.py) asks for reviews; its preference pairs prefer an answer that praises the
prompt's subject over one that pans it, and a program (`task.judge`) scores any answer. This script learns that
preference from the pairs alone: a `LlamaForSequenceClassification` with one output (a scalar reward), the same tiny
shape as the built-in policy (pipeline/builtin/model.py), freshly initialised (seeded) over the built-in word-level
tokenizer (pipeline/builtin/tokenizer.py). Each input is the pair's prompt messages plus an assistant message with the
answer, rendered with the tokenizer's chat template — exactly how a judge scores "prompt + answer with the reward
model's own chat template" — and pooled at the last non-pad token (right padding, `pad_token_id` in the config).

Training minimises the Bradley–Terry loss −log σ(r_chosen − r_rejected) with a plain `transformers.Trainer` whose
`compute_loss` scores chosen and rejected answers in one padded batch. Pairs are drawn from the task's train prompts
and checked on its held-out prompts (`task.split_prompts(seed, eval_fraction)`, the split the pipeline's built-in
data uses, so with `--seed` equal to params.yaml's `seed` the reward model never saw the pipeline's eval prompts):

- held-out accuracy: the share of held-out pairs with r_chosen > r_rejected (and their mean margin);
- judge agreement: how often the reward model prefers the answer `task.judge` scores higher, between fresh praising
  and panning answers to held-out prompts, made by the task's own answer function, half of them about a random noun
  rather than the prompt's subject (as a drifting policy might write).

Run (under a minute on one CPU thread at the default sizes; `--threads` for more):

    python examples/train_reward_model.py --out artifacts/reward_model

It writes the model (safetensors) and the tokenizer (with its chat template) to `--out`, and
`--out/reward_model.json` with both figures and the settings; it prints the accuracy. Then let the evaluate stage
judge the policy's answers with it (params.yaml):

    evaluate:
      judge: reward_model
      judge_model:
        name_or_path: artifacts/reward_model

(under `dvc repro`, list the directory in the evaluate stage's deps). In Python: `train_reward_model(...)` returns the
report, and `score(model, tokenizer, prompts, answers)` gives the rewards of answers to chat-message prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from pipeline.builtin import task
from pipeline.builtin.tokenizer import build_tokenizer


def render(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], answer: str) -> str:
    """The prompt's messages plus an assistant message with `answer`, in the tokenizer's chat template."""
    return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], answer: str) -> list[int]:
    return tokenizer(render(tokenizer, prompt, answer), add_special_tokens=False)["input_ids"]


def build_reward_model(
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
) -> LlamaForSequenceClassification:
    """A fresh tiny Llama with a one-output score head, shaped like the built-in policy (seeded)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,  # the head pools at the last token that is not pad
        num_labels=1,
    )
    return LlamaForSequenceClassification(config)


@torch.no_grad()
def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    answers: list[str],
    batch_size: int = 64,
) -> list[float]:
    """The scalar reward of each answer to its prompt (chat messages), rendered with the tokenizer's chat template."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if model.config.pad_token_id is None:
        raise ValueError("the reward model's config has no pad_token_id: it could not find each answer's last token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rewards: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = zip(prompts[start : start + batch_size], answers[start : start + batch_size])
        texts = [render(tokenizer, prompt, answer) for prompt, answer in chunk]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        logits = model(**batch).logits
        rewards.extend(logits[:, 0].float().cpu().tolist())
    model.train(was_training)
    return rewards


class PairCollator:
    """Pads a batch of pairs into one batch: the chosen sequences first, then the rejected ones (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class RewardTrainer(Trainer):
    """A Trainer whose loss is Bradley–Terry: −log σ(r_chosen − r_rejected), both scored in one forward pass."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss


def task_pairs(pairs: int, eval_pairs: int, seed: int, eval_fraction: float) -> tuple[list, list, list]:
    """Training pairs from the task's train prompts, held-out pairs from its held-out prompts (the pipeline's split
    and pair seeds for the built-in data), and the held-out prompts."""
    train_prompts, eval_prompts = task.split_prompts(seed, eval_fraction)
    train = task.preference_pairs(train_prompts, pairs, seed=seed + 1)
    return train, task.preference_pairs(eval_prompts, eval_pairs, seed=seed + 2), eval_prompts


def tokenized_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[dict]) -> list[dict]:
    return [
        {
            "chosen_input_ids": encode(tokenizer, p["prompt"], p["chosen"][0]["content"]),
            "rejected_input_ids": encode(tokenizer, p["prompt"], p["rejected"][0]["content"]),
        }
        for p in pairs
    ]


def pair_rewards(model, tokenizer, pairs: list[dict], batch_size: int) -> tuple[list[float], list[float]]:
    """The rewards of each pair's chosen and rejected answers."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score(model, tokenizer, prompts, [p["chosen"][0]["content"] for p in pairs], batch_size)
    rejected = score(model, tokenizer, prompts, [p["rejected"][0]["content"] for p in pairs], batch_size)
    return chosen, rejected


def judge_agreement(model, tokenizer, prompts: list, num_pairs: int, seed: int, batch_size: int) -> float:
    """On held-out prompts, fresh praising and panning answers from the task's answer function (each about the
    prompt's subject or, half the time, a random noun): how often the reward model prefers the answer `task.judge`
    scores higher."""
    rng = random.Random(seed)
    messages, firsts, seconds = [], [], []
    for i in range(num_pairs):
        noun, place, template = prompts[i % len(prompts)]
        messages.append(task.prompt_messages(noun, place, template))
        answers = [
            task.answer(noun if rng.random() < 0.5 else rng.choice(task.NOUNS), rng, positive)
            for positive in (True, False)
        ]
        rng.shuffle(answers)
        firsts.append(answers[0])
        seconds.append(answers[1])
    r_first = score(model, tokenizer, messages, firsts, batch_size)
    r_second = score(model, tokenizer, messages, seconds, batch_size)
    agree = [
        (rf > rs) == (task.judge(m, f) > task.judge(m, s))
        for m, f, s, rf, rs in zip(messages, firsts, seconds, r_first, r_second)
    ]
    return sum(agree) / len(agree)


def train_reward_model(
    out: Path,
    pairs: int = 2048,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    *,
    eval_pairs: int = 256,
    eval_fraction: float = 0.1,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> dict:
    """Train on `pairs` pairs of the task's train prompts, save model and tokenizer to `out`, and return (and write
    to out/reward_model.json) the report: held-out pair accuracy, judge agreement and the settings."""
    out = Path(out)
    settings = {
        "pairs": pairs,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "eval_pairs": eval_pairs,
        "eval_fraction": eval_fraction,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
    }
    tokenizer = build_tokenizer()
    train_pairs, heldout_pairs, eval_prompts = task_pairs(pairs, eval_pairs, seed, eval_fraction)
    model = build_reward_model(tokenizer, seed, hidden_size, num_layers, num_heads)

    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output_dir; nothing is checkpointed there
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=max(1, steps // 10),
            weight_decay=0.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,  # the collator needs chosen_input_ids / rejected_input_ids
            disable_tqdm=True,
            dataloader_pin_memory=False,  # tiny batches; no warning on a CPU-only machine
            seed=seed,
            data_seed=seed,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=tokenized_pairs(tokenizer, train_pairs),
            data_collator=PairCollator(tokenizer.pad_token_id),
        )
        result = trainer.train()
    model = trainer.model

    chosen, rejected = pair_rewards(model, tokenizer, heldout_pairs, batch_size=64)
    report = {
        "heldout_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(heldout_pairs),
        "heldout_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(heldout_pairs),  # mean r_c - r_r
        "judge_agreement": judge_agreement(model, tokenizer, eval_prompts, eval_pairs, seed=seed + 3, batch_size=64),
        "train_loss": result.training_loss,
        "heldout_pairs": len(heldout_pairs),
        "settings": settings,
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors; config.architectures == ["LlamaForSequenceClassification"]
    tokenizer.save_pretrained(out)  # keeps the chat template the judge renders with
    (out / "reward_model.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/reward_model"), help="directory to write")
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs (from the task's train prompts)")
    parser.add_argument("--eval-pairs", type=int, default=256, help="held-out pairs (from the held-out prompts)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="init, pairs and the prompt split (use params.yaml's seed)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="prompts held out (data.eval_fraction)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (tiny matrices: more threads mostly wait on each other)"
    )
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    report = train_reward_model(
        a.out,
        a.pairs,
        a.steps,
        a.batch_size,
        a.learning_rate,
        a.seed,
        eval_pairs=a.eval_pairs,
        eval_fraction=a.eval_fraction,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        num_heads=a.num_heads,
    )
    print(
        f"held-out pair accuracy {report['heldout_accuracy']:.3f} ({report['heldout_pairs']} pairs), "
        f"agreement with task.judge {report['judge_agreement']:.3f}; saved to {a.out}"
    )
    return report


if __name__ == "__main__":
    main()
