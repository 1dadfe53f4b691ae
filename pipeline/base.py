"""The base model: build and warm-start the built-in one, or resolve and record an external one.

Downstream stages load the policy, the default reference and the tokenizer through `base_source`,
so the base artifact is the one place that says which model the run starts from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .artifacts import file_digest, read_manifest
from .builtin import BUILTIN_MODEL, task
from .builtin.model import build_model
from .builtin.tokenizer import build_tokenizer
from .data.tokenize import tokenize_pair
from .errors import PipelineError
from .logps import token_logps
from .models import load_causal_lm, load_tokenizer

MODEL_SUBDIR = "model"


def warm_start(model, tokenizer, examples: list[dict], steps: int, batch_size: int, learning_rate: float, seed: int) -> list[float]:
    """A short supervised pass on prompt→completion examples (loss on completion tokens only)."""
    from .collator import DataCollatorForPreference

    torch.manual_seed(seed)
    rows = []
    for ex in examples:
        ids = tokenize_pair(tokenizer, {"conversational": True, "prompt": ex["prompt"], "chosen": ex["completion"],
                                        "rejected": ex["completion"], "tools": None, "chat_template_kwargs": None})
        rows.append(ids)
    collate = DataCollatorForPreference(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for _ in range(steps):
        index = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        batch = collate([rows[i] for i in index])
        n = len(index)  # the collator stacks chosen and rejected: here both are the completion
        ids, attention, mask = batch["input_ids"][:n], batch["attention_mask"][:n], batch["completion_mask"][:n, 1:].bool()
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        loss = -(token_logps(logits, ids[:, 1:]) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    model.eval()
    return history


def build_builtin_base(params: dict, out_dir: Path) -> dict:
    """Build the tiny built-in model and tokenizer, warm-start it, and save both under out_dir/model."""
    cfg = params["model"]["builtin"]
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=params["seed"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                        num_heads=cfg["num_heads"])
    train_prompts, _ = task.split_prompts(params["seed"], params["data"]["eval_fraction"])
    examples = task.warmup_examples(train_prompts, cfg["warmup_steps"] * cfg["warmup_batch_size"] // 4 + 1,
                                    cfg["warmup_positive_fraction"], seed=params["seed"] + 3)
    history = warm_start(model, tokenizer, examples, cfg["warmup_steps"], cfg["warmup_batch_size"],
                         cfg["warmup_learning_rate"], params["seed"])
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)
    return {"source": BUILTIN_MODEL, "revision": None, "warmup_loss_first": history[0], "warmup_loss_last": history[-1],
            "num_parameters": sum(p.numel() for p in model.parameters())}


def describe_external_base(params: dict) -> dict:
    """Record an external base model: a local directory with its file digests, or a Hub id at a resolved commit."""
    name, revision = params["model"]["name_or_path"], params["model"]["revision"]
    path = Path(name)
    if path.is_dir():
        files = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise PipelineError(f"model.name_or_path={name}: the directory holds no weights (*.safetensors / *.bin).")
        return {"source": str(path.resolve()), "revision": None, "source_files": files}
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(name, revision=revision)
    except Exception as err:
        raise PipelineError(f"model.name_or_path={name!r}: not a local directory and the Hub lookup failed "
                            f"({type(err).__name__}: {err}). Check the id and the network, or use a local directory.") from None
    return {"source": name, "revision": info.sha, "source_files": {s.rfilename: None for s in info.siblings or []}}


def base_source(base_dir: Path) -> tuple[str, str | None]:
    """(name or path, revision) to load the base model and tokenizer from."""
    manifest = read_manifest(base_dir, "base")
    if manifest["source"] == BUILTIN_MODEL:
        return str(Path(base_dir) / MODEL_SUBDIR), None
    return manifest["source"], manifest["revision"]


def load_base_tokenizer(base_dir: Path, params: dict):
    source, revision = base_source(base_dir)
    return load_tokenizer(source, revision=revision, trust_remote_code=params["model"]["trust_remote_code"],
                          pad_token=params["train"].get("pad_token"))


def load_base_model(base_dir: Path, params: dict):
    source, revision = base_source(base_dir)
    kwargs = {**params["model"]["model_init_kwargs"], "trust_remote_code": params["model"]["trust_remote_code"]}
    if revision:
        kwargs["revision"] = revision
    return load_causal_lm(source, kwargs)


def base_summary(base_dir: Path) -> str:
    return json.dumps({k: v for k, v in read_manifest(base_dir, "base").items() if k in ("source", "revision")})
