"""params.yaml: the defaults of every stage's knobs (their one home) and the check every stage runs.

A key that is not known, or a value of the wrong type, fails with the key's dotted name before any
model is loaded or data read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .builtin import BUILTIN_DATA, BUILTIN_MODEL
from .config import DPO_OPTION_NAMES, DPOConfig, validate_dpo_options
from .errors import PipelineError

ANY = object()  # a default of None accepts any type; this marks "any type" for non-None defaults

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {
        "name_or_path": BUILTIN_MODEL,  # builtin:tiny-llama, a Hub id or a local directory
        "revision": None,
        "trust_remote_code": False,
        "attn_implementation": None,  # e.g. sdpa, eager, flash_attention_2; None: the transformers default
        "model_init_kwargs": {},  # any from_pretrained() keyword; dtype as a string
        # an explicit reference model; None: the initial policy (for a new adapter: the adapter disabled)
        "ref_name_or_path": None,
        "ref_revision": None,
        "ref_model_init_kwargs": None,  # None: the policy's model_init_kwargs
        # an adapter (directory or Hub id) to continue training; its starting state is the reference
        "adapter": None,
        # a new LoRA adapter (peft.LoraConfig fields); off = full fine-tuning
        "peft": {"enabled": False, "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                 "bias": "none", "modules_to_save": None, "use_rslora": False, "use_dora": False},
        # QLoRA: the base loaded in 4 bits through bitsandbytes (CUDA only), with an adapter
        "quantization": {"load_in_4bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                         "bnb_4bit_use_double_quant": True},
        # the built-in model only: its size and the supervised warm start of the base stage
        "builtin": {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                    "warmup_steps": 800, "warmup_batch_size": 32, "warmup_learning_rate": 3e-3,
                    "warmup_positive_fraction": 0.3},
    },
    "data": {
        "train": BUILTIN_DATA,  # builtin:sentiment, a local file/directory or a Hub dataset id
        "eval": None,           # its own source, else carved from train with eval_fraction
        "eval_fraction": 0.1,
        "name": None,
        "split": "train",
        "eval_split": None,
        "revision": None,
        "prompt_marker": None,  # e.g. "\n\nAssistant:" to split implicit prompts at the last shared turn
        "columns": {},          # canonical name -> the source's column name, e.g. {chosen: accepted}
        "preprocess": None,     # "module:function" or "path/to/file.py:function": raw row -> canonical columns
        "on_invalid": "error",  # error | drop
        "builtin": {"num_pairs": 2000, "num_eval_pairs": 200},
    },
    "tokenize": {"max_length": 1024, "truncation_mode": "keep_start", "batch_size": 1000,
                 "dataset_num_proc": None},  # worker processes; None: tokenize in the stage's own process
    "ref_logps": {"precompute_ref_batch_size": 32},
    "train": {},  # any DPOConfig / TrainingArguments field: checked against DPOConfig itself
    "evaluate": {"batch_size": 32, "num_generations": 120, "max_new_tokens": 24},
    "export": {"push": {"enabled": False, "repo_id": None, "private": True}, "merge_adapter": True},
}

CHOICES = {"data.on_invalid": ("error", "drop"), "tokenize.truncation_mode": ("keep_start", "keep_end"),
           "model.peft.bias": ("none", "all", "lora_only")}
# keys whose value may take more than one type
TYPES = {"model.peft.target_modules": (str, list)}
# keys of the train section that are the train stage's own, not DPOConfig options
# DPOConfig options whose one home in params.yaml is another section: the stage that owns them applies
# them once for every later stage (the tokenize stage truncates the data train and evaluate read).
OWNED_ELSEWHERE = {"max_length": "tokenize.max_length", "truncation_mode": "tokenize.truncation_mode",
                   "dataset_num_proc": "tokenize.dataset_num_proc",
                   "precompute_ref_batch_size": "ref_logps.precompute_ref_batch_size",
                   "model_init_kwargs": "model.model_init_kwargs", "ref_model_init_kwargs": "model.ref_model_init_kwargs"}

TRAIN_STAGE_KEYS = {"resume": "train.resume: true (the last checkpoint) or a checkpoint path; false/null: start fresh"}


def _check(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, dict):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise PipelineError(f"params: {key} must be a mapping, got {type(value).__name__}.")
        if default:  # a non-empty default mapping lists every allowed key
            unknown = sorted(set(value) - set(default))
            if unknown:
                raise PipelineError(f"params: unknown key {key + '.' if key else ''}{unknown[0]}; "
                                    f"known keys of {key or 'the top level'}: {sorted(default)}.")
            return {k: _check(value.get(k, default[k]), default[k], f"{key}.{k}" if key else k) for k in default}
        return dict(value)
    if default is None or value is None:
        return value
    if key in TYPES:
        if not isinstance(value, TYPES[key]):
            raise PipelineError(f"params: {key} must be one of {[t.__name__ for t in TYPES[key]]}, got {value!r}.")
        return value
    expected = float if isinstance(default, float) else type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise PipelineError(f"params: {key} must be {expected.__name__}, got {value!r}.")
    if key in CHOICES and value not in CHOICES[key]:
        raise PipelineError(f"params: {key} must be one of {list(CHOICES[key])}, got {value!r}.")
    return value


TRAIN_KEYS = set(DPOConfig.__dataclass_fields__) - {"output_dir"}


def check_params(raw: dict | None) -> dict:
    """Merge `raw` over the defaults and validate it; returns the full, typed params."""
    params = _check(raw or {}, DEFAULTS, "")
    unknown = sorted(set(params["train"]) - TRAIN_KEYS - set(TRAIN_STAGE_KEYS))
    if unknown:
        raise PipelineError(f"params: unknown key train.{unknown[0]}; train takes DPOConfig options "
                            f"(e.g. beta, loss_type, learning_rate); see `python -c 'import pipeline; help(pipeline.DPOConfig)'`.")
    train = params["train"]
    for key in sorted(set(train) & set(OWNED_ELSEWHERE)):
        raise PipelineError(f"params: train.{key} belongs in {OWNED_ELSEWHERE[key]} in the pipeline (that stage applies it "
                            f"for every later one); move it there.")
    for key, value in train.items():
        # YAML 1.1 (and `dvc exp run -S`, which rewrites params.yaml) reads a bare `no` as false
        if value is False and key in TRAIN_KEYS and isinstance(DPOConfig.__dataclass_fields__[key].default, str):
            train[key] = "no"
    validate_dpo_options({k: v for k, v in train.items() if k in DPO_OPTION_NAMES})
    _check_models(params)
    if not 0 < params["data"]["eval_fraction"] < 1:
        raise PipelineError(f"params: data.eval_fraction must be in (0, 1), got {params['data']['eval_fraction']}.")
    return params


def _check_models(params: dict) -> None:
    """Model, adapter and reference combinations that cannot work, refused before anything is loaded."""
    model, train = params["model"], params["train"]
    resume = train.get("resume")
    if resume is not None and not isinstance(resume, (bool, str)):
        raise PipelineError(f"params: {TRAIN_STAGE_KEYS['resume']} (got {resume!r}).")
    ref_kwargs = model["ref_model_init_kwargs"]
    if ref_kwargs is not None and not isinstance(ref_kwargs, dict):
        raise PipelineError(f"params: model.ref_model_init_kwargs must be a mapping or null, got {ref_kwargs!r}.")
    if model["peft"]["enabled"] and model["adapter"]:
        raise PipelineError("params: model.adapter continues a PeftModel and model.peft.enabled adds a new adapter "
                            "(you passed a PeftModel and a peft_config): set model.peft.enabled: false to continue "
                            "training the adapter, or model.adapter: null to train a new one.")
    adapters = model["peft"]["enabled"] or bool(model["adapter"])
    if model["quantization"]["load_in_4bit"] and not adapters:
        raise PipelineError("params: model.quantization.load_in_4bit (QLoRA) trains an adapter on a frozen 4-bit base; "
                            "set model.peft.enabled: true (or model.adapter) as well.")
    if train.get("sync_ref_model") and adapters and not model["ref_name_or_path"]:
        raise PipelineError("params: train.sync_ref_model is not supported when training with PEFT models that do "
                            "not keep a standalone ref_model; set model.ref_name_or_path or turn sync_ref_model off.")


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: no such params file; run from the project root or pass --params.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    try:
        return check_params(raw)
    except PipelineError as err:
        raise PipelineError(f"{path}: {err}") from None


def defaults() -> dict:
    return copy.deepcopy(check_params({}))
