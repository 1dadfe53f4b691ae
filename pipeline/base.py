"""The base model: build and warm-start the built-in one, or resolve and record an external one.

Downstream stages load the policy, the reference and the tokenizer through the sources this
artifact records (`base_source`, `reference_source`, `adapter_source`), so the base artifact is the one
place that says which model the run starts from, which reference it compares with, and which adapter
it continues.
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
from .models import is_adapter_dir, is_quantized, load_adapter, load_causal_lm, load_tokenizer, lora_config

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


def describe_source(name: str, revision: str | None, key: str) -> dict:
    """Record a model or adapter source: a local directory with its file digests, or a Hub id at a resolved commit."""
    path = Path(name)
    if path.is_dir():
        files = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise PipelineError(f"{key}={name}: the directory holds no weights (*.safetensors / *.bin).")
        return {"source": str(path.resolve()), "revision": None, "source_files": files}
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(name, revision=revision)
    except Exception as err:
        raise PipelineError(f"{key}={name!r}: not a local directory and the Hub lookup failed "
                            f"({type(err).__name__}: {err}). Check the id and the network, or use a local directory.") from None
    return {"source": name, "revision": info.sha, "source_files": {s.rfilename: None for s in info.siblings or []}}


def describe_external_base(params: dict) -> dict:
    return describe_source(params["model"]["name_or_path"], params["model"]["revision"], "model.name_or_path")


def describe_reference_and_adapter(params: dict) -> dict:
    """The base manifest's record of an explicit reference model and of an adapter to continue, when set."""
    cfg, info = params["model"], {}
    if cfg["ref_name_or_path"]:
        info["reference"] = describe_source(cfg["ref_name_or_path"], cfg["ref_revision"], "model.ref_name_or_path")
    if cfg["adapter"]:
        adapter = describe_source(cfg["adapter"], None, "model.adapter")
        if adapter["revision"] is None and "adapter_config.json" not in adapter["source_files"]:
            raise PipelineError(f"model.adapter={cfg['adapter']}: no adapter_config.json there; give a PEFT adapter "
                                "directory (as saved by train with model.peft.enabled) or a Hub adapter id.")
        info["adapter"] = adapter
    return info


def base_source(base_dir: Path) -> tuple[str, str | None]:
    """(name or path, revision) to load the base model and tokenizer from."""
    manifest = read_manifest(base_dir, "base")
    if manifest["source"] == BUILTIN_MODEL:
        return str(Path(base_dir) / MODEL_SUBDIR), None
    return manifest["source"], manifest["revision"]


def _recorded_source(base_dir: Path, key: str) -> tuple[str, str | None] | None:
    entry = read_manifest(base_dir, "base").get(key)
    return None if entry is None else (entry["source"], entry["revision"])


def reference_source(base_dir: Path) -> tuple[str, str | None] | None:
    """The explicit reference model recorded by the base stage (model.ref_name_or_path), or None."""
    return _recorded_source(base_dir, "reference")


def adapter_source(base_dir: Path) -> tuple[str, str | None] | None:
    """The adapter to continue training recorded by the base stage (model.adapter), or None."""
    return _recorded_source(base_dir, "adapter")


def model_kwargs(params: dict, reference: bool = False) -> dict:
    """`from_pretrained` keywords of the policy (or of an explicit reference) from the model.* params."""
    cfg = params["model"]
    own = cfg["ref_model_init_kwargs"] if reference and cfg["ref_model_init_kwargs"] is not None else cfg["model_init_kwargs"]
    kwargs = {"trust_remote_code": cfg["trust_remote_code"], **own}
    if cfg["attn_implementation"]:
        kwargs.setdefault("attn_implementation", cfg["attn_implementation"])
    quantization = {k: v for k, v in cfg["quantization"].items()}
    if quantization.pop("load_in_4bit") and not reference:
        kwargs.setdefault("quantization_config", {"load_in_4bit": True, **quantization})
    return kwargs


def load_base_tokenizer(base_dir: Path, params: dict):
    source, revision = base_source(base_dir)
    return load_tokenizer(source, revision=revision, trust_remote_code=params["model"]["trust_remote_code"],
                          pad_token=params["train"].get("pad_token"))


def load_base_model(base_dir: Path, params: dict, quantized: bool = True):
    """The base model; 4-bit (QLoRA) when model.quantization asks, unless `quantized` is False (export merges
    the adapter into the full-precision base)."""
    source, revision = base_source(base_dir)
    kwargs = model_kwargs(params)
    if not quantized:
        kwargs.pop("quantization_config", None)
    if revision:
        kwargs["revision"] = revision
    model = load_causal_lm(source, kwargs)
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=params["train"].get("gradient_checkpointing", True))
    return model


def peft_config(params: dict):
    """The LoRA configuration of a new adapter (model.peft.enabled), or None for full fine-tuning."""
    return lora_config(params["model"]["peft"]) if params["model"]["peft"]["enabled"] else None


def load_policy(base_dir: Path, params: dict):
    """The starting policy: the base model, carrying the adapter to continue (trainable) when model.adapter is set."""
    model = load_base_model(base_dir, params)
    adapter = adapter_source(base_dir)
    if adapter is not None:
        model = load_adapter(model, adapter[0], trainable=True, revision=adapter[1])
    return model


def load_explicit_reference(base_dir: Path, params: dict):
    """The model of model.ref_name_or_path (its own ref_model_init_kwargs), or None."""
    source = reference_source(base_dir)
    if source is None:
        return None
    kwargs = model_kwargs(params, reference=True)
    if source[1]:
        kwargs["revision"] = source[1]
    return load_causal_lm(source[0], kwargs)


def load_reference(base_dir: Path, params: dict):
    """The reference the online training path uses, as a standalone frozen model.

    An explicit reference model; else the initial policy: the base model, carrying the starting adapter
    when one is continued. (A new adapter's reference, the policy with its adapter disabled, is the base.)
    """
    model = load_explicit_reference(base_dir, params)
    if model is None:
        model = load_base_model(base_dir, params)
        adapter = adapter_source(base_dir)
        if adapter is not None:
            model = load_adapter(model, adapter[0], trainable=False, revision=adapter[1])
    model.eval()
    model.requires_grad_(False)
    return model


def load_trained_policy(model_dir: Path, base_dir: Path, params: dict):
    """The trained policy of the train stage: a full model, or its adapter on the base model."""
    if is_adapter_dir(model_dir):
        return load_adapter(load_base_model(base_dir, params), model_dir, trainable=False)
    return load_causal_lm(str(model_dir), {"trust_remote_code": params["model"]["trust_remote_code"]})


def base_summary(base_dir: Path) -> str:
    return json.dumps({k: v for k, v in read_manifest(base_dir, "base").items() if k in ("source", "revision")})
