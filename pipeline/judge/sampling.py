"""What the judges compare: held-out prompts (the eval split's, or a prompts file) and the answers a model writes to
them, greedy or sampled, seeded and batched.

A prompt is `{"prompt": chat messages or text, "images": stored images or None}`: messages are rendered with the
chat template (and a generation prompt), text is tokenized as `tokenize` does a standard row's prompt (with the
tokenizer's special prefix); a prompt with images goes through the processor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.core.errors import PipelineError
from pipeline.data.images import image_digests, open_image
from pipeline.data.invalid import InvalidRow
from pipeline.data.processing import chat_renderer, tokenizer_of
from pipeline.data.schema import decoded_row
from pipeline.data.sources import iter_rows
from pipeline.store.dvc_deps import require_dvc_deps

PROMPTS_KEY = "evaluate.prompts"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How answers are written (the evaluate.* settings): greedy unless `do_sample`; `num_samples` answers per
    prompt; `seed` seeds each batch (the same stream for the policy and the reference: common random numbers)."""

    max_new_tokens: int
    batch_size: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    @classmethod
    def of_params(cls, params: dict) -> Sampling:
        cfg = params["evaluate"]
        return cls(
            max_new_tokens=cfg["max_new_tokens"],
            batch_size=cfg["batch_size"],
            do_sample=cfg["do_sample"],
            temperature=cfg["temperature"],
            top_p=cfg["top_p"],
            num_samples=cfg["num_samples_per_prompt"],
            seed=params["seed"],
        )


@torch.no_grad()
def generate_answers(model, processing_class, prompts: list[dict], sampling: Sampling) -> list[list[str]]:
    """`sampling.num_samples` answers of `model` to each prompt (a list per prompt, in the prompts' order), decoded
    without special tokens and stripped. Batch k is seeded with `sampling.seed + k`, so a run is reproducible for a
    given batch size and number of processes."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer = tokenizer_of(processing_class)
    render = chat_renderer(processing_class).apply_chat_template
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    extra = {"do_sample": False}
    if sampling.do_sample:
        extra = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    answers: list[list[str]] = []
    try:
        for k, start in enumerate(range(0, len(prompts), sampling.batch_size)):
            chunk = prompts[start : start + sampling.batch_size]
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
            torch.manual_seed(sampling.seed + k)
            out = model.generate(
                **batch,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **extra,
            )
            decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            n = sampling.num_samples
            answers += [[a.strip() for a in decoded[i * n : (i + 1) * n]] for i in range(len(chunk))]
    finally:
        tokenizer.padding_side = side
    return answers


def answer_length(processing_class, answer: str) -> int:
    """An answer's length in the policy tokenizer's tokens (what length control compares)."""
    return len(tokenizer_of(processing_class)(answer, add_special_tokens=False)["input_ids"])


def prompt_text(messages: list[dict] | str) -> str:
    """The last turn of a prompt as text (an image part as "[image]"); a text prompt as it is."""
    if isinstance(messages, str):
        return messages
    content = messages[-1]["content"]
    if isinstance(content, list):
        return " ".join("[image]" if part.get("type") == "image" else part.get("text", "") for part in content)
    return content


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


def _prompt_problem(prompt) -> str | None:
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is empty"
    if not isinstance(prompt, list) or not prompt:
        return "`prompt` must be text or a non-empty list of chat messages"
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            return "every message needs a `role` and a `content`"
    if prompt[-1]["role"] == "assistant":
        return "the last message is the assistant's: a prompt ends with the user's turn"
    return None


def prompts_file(path: str, limit: int) -> list[dict]:
    """The prompts of evaluate.prompts (`{"prompt", "images": None}`), in file order, at most `limit`: every row
    needs a `prompt` (text or chat messages); a file without one is refused, naming the file, row and fix."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"{PROMPTS_KEY}={path}: no such file; give a .jsonl, .json or .parquet file of prompts.")
    require_dvc_deps([(PROMPTS_KEY, path, [file])])
    prompts = []
    for source, index, row in iter_rows(path):
        if isinstance(row, InvalidRow):
            raise PipelineError(f"{PROMPTS_KEY}: {source} row {index}: {row.detail}; fix the row or remove it.")
        problem = "no `prompt` field" if "prompt" not in row else _prompt_problem(row["prompt"])
        if problem:
            raise PipelineError(
                f"{PROMPTS_KEY}: {source} row {index}: {problem}; each row needs a `prompt`: text or chat "
                'messages ([{"role": "user", "content": "..."}]).'
            )
        if len(prompts) < limit:
            prompts.append({"prompt": row["prompt"], "images": None})
    if not prompts:
        raise PipelineError(
            f"{PROMPTS_KEY}={path}: the file holds no prompts; add rows with a `prompt` field, or set "
            f"{PROMPTS_KEY}: null to use the eval split's prompts."
        )
    return prompts


def evaluation_prompts(params: dict, normalized: Path) -> list[dict]:
    """The held-out prompts evaluate answers: evaluate.prompts' file, else the eval split's; at most
    evaluate.num_generations of them."""
    cfg = params["evaluate"]
    if cfg["num_generations"] == 0:
        return []
    if cfg["prompts"]:
        return prompts_file(cfg["prompts"], cfg["num_generations"])
    return held_out_prompts(normalized, cfg["num_generations"])
