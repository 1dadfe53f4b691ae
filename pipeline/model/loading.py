"""Every model, adapter and tokenizer load of the project, with `from_pretrained` keyword arguments.

Stages load through the base artifact's records (`pipeline.store.base_record`): the base model, the adapter to
continue, an explicit reference model, the trained policy. What the reference *is* is decided in one
place, `pipeline.objective.reference.resolve_reference`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from pipeline.config.options import from_pretrained_kwargs
from pipeline.core.errors import PipelineError
from pipeline.data.processing import tokenizer_of
from pipeline.store.base_record import adapter_source, base_source, reference_source, round_reference

logger = logging.getLogger(__name__)


def init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`model_init_kwargs` as `from_pretrained` takes them: dtype names (`bfloat16`, `auto`) pass through as
    strings, which `from_pretrained` accepts; a `quantization_config` mapping becomes a `BitsAndBytesConfig`."""
    kwargs = dict(kwargs or {})
    quantization = kwargs.get("quantization_config")
    if isinstance(quantization, dict):
        kwargs["quantization_config"] = bitsandbytes_config(quantization)
    return kwargs


def bitsandbytes_config(options: dict[str, Any]):
    """A `BitsAndBytesConfig` from plain options (dtype names as strings), refused without CUDA."""
    from transformers import BitsAndBytesConfig

    options = dict(options)
    options.pop("quant_method", None)
    require_bitsandbytes(options)
    return BitsAndBytesConfig(**options)


def require_bitsandbytes(options: dict[str, Any]) -> None:
    """4-/8-bit loading (QLoRA) runs on CUDA through bitsandbytes; say so clearly anywhere else."""
    if not (options.get("load_in_4bit") or options.get("load_in_8bit")):
        return
    if not torch.cuda.is_available():
        raise PipelineError(
            "4-bit/8-bit loading (QLoRA: model.quantization.load_in_4bit) needs a CUDA GPU and "
            "bitsandbytes; this machine has no CUDA device. Set model.quantization.load_in_4bit: false "
            "(LoRA on the unquantized base) or run on a GPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PipelineError("4-bit/8-bit loading (QLoRA) needs bitsandbytes: pip install bitsandbytes.")


def is_quantized(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def is_vision_config(config) -> bool:
    """Whether a model config is a vision-language model's (it nests a vision encoder's config)."""
    return getattr(config, "vision_config", None) is not None


def is_vision_model(model) -> bool:
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return is_vision_config(getattr(inner, "config", None))


def config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` keywords that say where a config is (not how the model is built)."""
    keys = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder")
    return {k: v for k, v in kwargs.items() if k in keys}


def is_vision_source(name_or_path: str, kwargs: dict[str, Any]) -> bool:
    """Whether the model at `name_or_path` is a vision-language model, by its config (False without a config,
    e.g. a tokenizer-only directory: the loader then says what is missing)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, **config_kwargs(kwargs))
    except (OSError, ValueError):
        return False
    return is_vision_config(config)


def load_causal_lm(name_or_path: str, kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """The model at `name_or_path` with any `from_pretrained` keyword: `AutoModelForCausalLM`, or
    `AutoModelForImageTextToText` for a vision-language model (its config nests a vision config); remote code
    stays off unless asked."""
    kwargs = init_kwargs(kwargs)
    kwargs.setdefault("trust_remote_code", False)
    announce_hub(name_or_path, "model")
    try:
        if is_vision_source(name_or_path, kwargs):
            from transformers import AutoModelForImageTextToText

            return AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise PipelineError(
            f"model {name_or_path!r}: could not be loaded ({err}). Give a local directory or a Hub "
            "id that is reachable (check HF_HUB_OFFLINE and the network)."
        ) from None


def sequence_classifier_problem(name_or_path: str, kwargs: dict[str, Any]) -> str | None:
    """Why the model at `name_or_path` is not a one-score sequence classifier (a reward model), from its config
    alone; None when it is one."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, **config_kwargs(kwargs))
    except (OSError, ValueError) as err:
        return f"its config could not be read ({err})"
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return f"it is not a sequence-classification model (its architectures: {architectures or 'none recorded'})"
    if getattr(config, "num_labels", 1) != 1:
        return f"it has {config.num_labels} labels; a reward model has one score (num_labels 1)"
    return None


def load_sequence_classifier(name_or_path: str, kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """The sequence-classification model at `name_or_path` (a reward model) with any `from_pretrained` keyword; remote
    code stays off unless asked."""
    kwargs = init_kwargs(kwargs)
    kwargs.setdefault("trust_remote_code", False)
    announce_hub(name_or_path, "reward model")
    try:
        return AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise PipelineError(
            f"reward model {name_or_path!r}: could not be loaded ({err}). Give a local directory or a Hub "
            "id that is reachable (check HF_HUB_OFFLINE and the network)."
        ) from None


def announce_hub(name_or_path: str, what: str) -> None:
    """One line before a load that asks the Hub (a Hub id, not a local directory, with HF_HUB_OFFLINE unset): without
    a network it waits for the connection to time out, which would otherwise pass in silence."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not Path(str(name_or_path)).expanduser().exists():
        logger.warning(
            "%s %r: asking the Hub (without a network this waits for the connection to time out, about a "
            "minute; HF_HUB_OFFLINE=1 uses the local cache alone and fails at once)",
            what,
            name_or_path,
        )


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, pad_token: str | None = None
):
    """The processing class of the model at `name_or_path`: its tokenizer, or for a vision-language model its
    processor (`AutoProcessor`: the tokenizer and the image processor)."""
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    announce_hub(name_or_path, "tokenizer")
    try:
        if is_vision_source(name_or_path, kwargs):
            from transformers import AutoProcessor

            processing_class = AutoProcessor.from_pretrained(name_or_path, **kwargs)
        else:
            processing_class = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise PipelineError(f"tokenizer {name_or_path!r}: could not be loaded ({err}).") from None
    return with_pad_token(processing_class, pad_token)


def with_pad_token(processing_class, pad_token: str | None = None):
    """Set the pad token (of a processor's tokenizer): the one asked for, else the tokenizer's own, else its EOS
    token. Returns `processing_class`."""
    tokenizer = tokenizer_of(processing_class)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError("the tokenizer has neither a pad token nor an EOS token; set pad_token in DPOConfig.")
        tokenizer.pad_token = tokenizer.eos_token
    return processing_class


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: every nn.Dropout (LoRA's included) and the functional attention dropout rate of attention layers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# ---- adapters ---------------------------------------------------------------------------------


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_config(options: dict[str, Any]):
    """A `peft.LoraConfig` for a causal LM from params.yaml's `model.peft` (without `enabled`)."""
    from peft import LoraConfig

    options = {k: v for k, v in options.items() if k != "enabled"}
    try:
        return LoraConfig(task_type="CAUSAL_LM", **options)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"params: model.peft: {err}") from None


def load_adapter(base_model: PreTrainedModel, adapter: str | Path, trainable: bool, revision: str | None = None):
    """The adapter at `adapter` (a directory or Hub id) on `base_model`; trainable to continue training it."""
    from peft import PeftModel

    kwargs = {"revision": revision} if revision else {}
    try:
        return PeftModel.from_pretrained(base_model, str(adapter), is_trainable=trainable, **kwargs)
    except (OSError, ValueError) as err:
        raise PipelineError(
            f"adapter {str(adapter)!r}: could not be loaded ({err}). Give an adapter directory "
            "(adapter_config.json + weights) or a reachable Hub id."
        ) from None


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_trained_model(
    model_dir, kwargs: dict[str, Any] | None = None, base_model: PreTrainedModel | None = None
) -> torch.nn.Module:
    """A trained policy directory: a full model, or an adapter (on `base_model` when given, else on the
    base its adapter_config names)."""
    if is_adapter_dir(model_dir):
        if base_model is not None:
            return load_adapter(base_model, model_dir, trainable=False)
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(str(model_dir)).base_model_name_or_path
        return load_adapter(load_causal_lm(base, kwargs), model_dir, trainable=False)
    return load_causal_lm(str(model_dir), kwargs)


@torch.no_grad()
def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights `model` computes with, by the names a plain (non-PEFT) model of its architecture uses:
    for a PeftModel, each LoRA layer's base weight plus the active adapters' deltas."""
    if not is_peft_model(model):
        return dict(model.named_parameters())
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    weights: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                if adapter in module.lora_A and not module.disable_adapters:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            weights[f"{name}.weight"] = weight
    for name, param in base.named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue
        parts = name.replace(".base_layer.", ".").split(".")
        if "modules_to_save" in parts:  # the trained copy of a fully trained module
            i = parts.index("modules_to_save")
            parts = parts[:i] + parts[i + 2 :]
        weights.setdefault(".".join(parts), param)
    return weights


# ---- the pipeline's models, through the base artifact ------------------------------------------------


def model_kwargs(params: dict, reference: bool = False) -> dict:
    """`from_pretrained` keywords of the policy (or of an explicit reference) from the model.* params."""
    cfg = params["model"]
    kwargs = from_pretrained_kwargs(cfg, reference)
    if cfg["attn_implementation"]:
        kwargs.setdefault("attn_implementation", cfg["attn_implementation"])
    quantization = dict(cfg["quantization"])
    if quantization.pop("load_in_4bit") and not reference:
        kwargs.setdefault("quantization_config", {"load_in_4bit": True, **quantization})
    return kwargs


def load_base_tokenizer(base_dir: Path, params: dict):
    source, revision = base_source(base_dir)
    return load_tokenizer(
        source,
        revision=revision,
        trust_remote_code=params["model"]["trust_remote_code"],
        pad_token=params["train"].get("pad_token"),
    )


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
            model, use_gradient_checkpointing=params["train"].get("gradient_checkpointing", True)
        )
    return model


def peft_config(params: dict):
    """The LoRA configuration of a new adapter (model.peft.enabled), or None for full fine-tuning."""
    return lora_config(params["model"]["peft"]) if params["model"]["peft"]["enabled"] else None


def new_adapter_config(params: dict, base_dir: Path):
    """`peft_config` for training from the base artifact: None when the policy already carries the adapter it
    trains (an iterative LoRA round continues the adapter of the round before)."""
    return peft_config(params) if adapter_source(base_dir) is None else None


def reference_is_adapter_off(params: dict, base_dir: Path) -> bool:
    """Whether the reference is the policy with its LoRA adapter off: a new adapter's (model.peft.enabled), and an
    iterative LoRA round's continued adapter when the round's reference is the initial model."""
    if not params["model"]["peft"]["enabled"]:
        return False
    return adapter_source(base_dir) is None or round_reference(base_dir) == "initial"


def load_policy(base_dir: Path, params: dict, trainable: bool = True):
    """The initial policy: the base model, carrying the adapter to continue when model.adapter is set."""
    model = load_base_model(base_dir, params)
    adapter = adapter_source(base_dir)
    if adapter is not None:
        model = load_adapter(model, adapter[0], trainable=trainable, revision=adapter[1])
    return model


def load_explicit_reference(base_dir: Path, params: dict):
    """The model of model.ref_name_or_path (with its own ref_model_init_kwargs), or None."""
    source = reference_source(base_dir)
    if source is None:
        return None
    kwargs = model_kwargs(params, reference=True)
    if source[1]:
        kwargs["revision"] = source[1]
    return load_causal_lm(source[0], kwargs)


def load_trained_policy(model_dir: Path, base_dir: Path, params: dict):
    """The trained policy of the train stage: a full model, or its adapter on the base model."""
    if is_adapter_dir(model_dir):
        return load_adapter(load_base_model(base_dir, params), model_dir, trainable=False)
    return load_causal_lm(str(model_dir), {"trust_remote_code": params["model"]["trust_remote_code"]})
