"""Loading policies, references and tokenizers by name, with `from_pretrained` keyword arguments."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import PipelineError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`model_init_kwargs` with `dtype` (or legacy `torch_dtype`) given as a string resolved to a torch dtype."""
    kwargs = dict(kwargs or {})
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PipelineError(f"model_init_kwargs.dtype={dtype!r} is not a dtype; use one of {sorted(DTYPES)}.")
        kwargs["dtype"] = DTYPES[dtype]
    return kwargs


def load_causal_lm(name_or_path: str, kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    kwargs = init_kwargs(kwargs)
    kwargs.setdefault("trust_remote_code", False)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise PipelineError(f"model {name_or_path!r}: could not be loaded ({err}). Give a local directory or a Hub "
                            "id that is reachable (check HF_HUB_OFFLINE and the network).") from None


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   pad_token: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise PipelineError(f"tokenizer {name_or_path!r}: could not be loaded ({err}).") from None
    return with_pad_token(tokenizer, pad_token)


def with_pad_token(tokenizer, pad_token: str | None = None):
    """Set the pad token: the one asked for, else the tokenizer's own, else its EOS token."""
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError("the tokenizer has neither a pad token nor an EOS token; set pad_token in DPOConfig.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_trained_model(model_dir, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """A trained policy directory: a full model, or an adapter (loaded on its base model)."""
    from pathlib import Path

    if (Path(model_dir) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM
        return AutoPeftModelForCausalLM.from_pretrained(str(model_dir), **init_kwargs(kwargs))
    return load_causal_lm(str(model_dir), kwargs)
