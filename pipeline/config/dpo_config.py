"""`DPOConfig`: the Hugging Face `TrainingArguments` plus every DPO option, checked when built."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import TrainingArguments

from pipeline.config.loss_options import check_loss_options
from pipeline.config.options import (
    BF16_HELP,
    DPO_OPTION_NAMES,
    DPO_OPTIONS,
    TRAINING_DEFAULTS,
    TRAINING_RULES,
    check_finite,
    field_rules,
    from_pretrained_kwargs,
)
from pipeline.config.rules import check
from pipeline.core.errors import PipelineError
from pipeline.core.redaction import credential_fields, redact

# transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*, warning on the old names; DPOConfig
# takes the reference documentation's names and passes them on under the new ones where the installed transformers
# has them (an older one reads the old names itself)
CHECKPOINTING_NAMES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def option(name: str):
    """A DPOConfig field whose default and help are `DPO_OPTIONS[name]`'s (HfArgumentParser hands the help to
    argparse; the value rule is checked in `__post_init__`)."""
    entry = DPO_OPTIONS[name]
    return (
        field(default_factory=entry.default_value, metadata={"help": entry.help})
        if isinstance(entry.default, (list, dict))
        else field(default=entry.default, metadata={"help": entry.help})
    )


def overridden(name: str, **metadata):
    """A TrainingArguments field with DPOConfig's default (`TRAINING_DEFAULTS`)."""
    return field(default=TRAINING_DEFAULTS[name], **({"metadata": metadata} if metadata else {}))


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_dpo_options(options: dict[str, Any], name=lambda key: key) -> None:
    """Every validation rule of DPOConfig: the value rule of each option present, then the rules that
    combine options (losses.md, the reference documentation's constraints). Shared by `DPOConfig` and the
    params.yaml check, which names options as it spells them (`name("beta")` → "train.beta")."""
    check_finite(options, name)
    for key, (rule, fix) in field_rules().items():
        if key in options:
            try:
                check(options[key], rule, name(key), fix)
            except TypeError:  # e.g. a string where a number belongs
                raise PipelineError(f"{name(key)} has the wrong type (got {options[key]!r}).") from None
    check_loss_options(options, name)
    epochs, max_steps = options.get("num_train_epochs"), options.get("max_steps", -1)
    if epochs is not None and not (max_steps or -1) > 0 and not epochs > 0:
        raise PipelineError(
            f"{name('num_train_epochs')} must be > 0 (got {epochs!r}) unless {name('max_steps')} > 0: "
            "a run of no steps would publish the untrained model as trained."
        )
    loss_types = as_list(options.get("loss_type", []))
    precompute = options.get("precompute_ref_log_probs", False)
    if options.get("use_liger_kernel"):
        if len(loss_types) > 1:
            raise PipelineError(
                f"use_liger_kernel=True supports a single loss_type only; drop the extra types of "
                f"{name('loss_type')} or turn off {name('use_liger_kernel')}."
            )
        if precompute:
            raise PipelineError(
                f"use_liger_kernel=True is not supported with precompute_ref_log_probs=True; turn off "
                f"{name('use_liger_kernel')} or {name('precompute_ref_log_probs')}."
            )
    if options.get("sync_ref_model") and precompute:
        raise PipelineError(
            f"sync_ref_model=True cannot be combined with precompute_ref_log_probs=True (the reference "
            f"changes during training); turn off {name('sync_ref_model')} or "
            f"{name('precompute_ref_log_probs')}."
        )


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class DPOConfig(TrainingArguments):
    """Configuration of `DPOTrainer`: `TrainingArguments` with the DPO options of the reference docs.

    Defaults that differ from `TrainingArguments`: logging_steps=10, gradient_checkpointing=True,
    learning_rate=1e-6, bf16 on when the hardware supports it and fp16 is off,
    remove_unused_columns=False (the collator needs the token-id columns).
    """

    # overridden TrainingArguments defaults
    output_dir: str | None = overridden("output_dir")
    learning_rate: float = overridden("learning_rate")
    logging_steps: float = overridden("logging_steps")
    gradient_checkpointing: bool | None = overridden("gradient_checkpointing")
    bf16: bool | None = overridden("bf16", help=BF16_HELP)
    remove_unused_columns: bool = overridden("remove_unused_columns")

    # model
    model_init_kwargs: dict[str, Any] | None = option("model_init_kwargs")
    ref_model_init_kwargs: dict[str, Any] | None = option("ref_model_init_kwargs")
    trust_remote_code: bool = option("trust_remote_code")
    disable_dropout: bool = option("disable_dropout")

    # data
    dataset_num_proc: int | None = option("dataset_num_proc")
    on_invalid: str = option("on_invalid")
    pad_token: str | None = option("pad_token")
    padding_free: bool = option("padding_free")
    prefix_sharing: bool = option("prefix_sharing")
    packing: bool = option("packing")
    pad_to_multiple_of: int | None = option("pad_to_multiple_of")
    max_length: int | None = option("max_length")
    truncation_mode: str = option("truncation_mode")

    # reference
    precompute_ref_log_probs: bool = option("precompute_ref_log_probs")
    precompute_ref_batch_size: int | None = option("precompute_ref_batch_size")
    sync_ref_model: bool = option("sync_ref_model")
    ref_model_mixup_alpha: float = option("ref_model_mixup_alpha")
    ref_model_sync_steps: int = option("ref_model_sync_steps")

    # objective
    loss_type: list[str] = option("loss_type")
    loss_weights: list[float] | None = option("loss_weights")
    beta: float = option("beta")
    f_divergence_type: str = option("f_divergence_type")
    f_alpha_divergence_coef: float = option("f_alpha_divergence_coef")
    label_smoothing: float = option("label_smoothing")
    use_weighting: bool = option("use_weighting")
    ld_alpha: float | None = option("ld_alpha")
    discopop_tau: float = option("discopop_tau")
    router_aux_loss_coef: float = option("router_aux_loss_coef")

    # speed and memory
    activation_offloading: bool = option("activation_offloading")

    # faults
    max_nonfinite_steps: int = option("max_nonfinite_steps")

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in as_list(self.loss_weights)]
        for old, new in CHECKPOINTING_NAMES:  # the reference docs' names, under the new ones where they exist
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_supported()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # launched as several processes on a machine without GPUs: data parallelism over gloo (accelerate's
                # MULTI_CPU); without use_cpu the Trainer would run each process alone, silently
                self.use_cpu = True
        check_finite({f.name: getattr(self, f.name) for f in fields(self)})
        check_dpo_options(
            {
                name: getattr(self, name)
                for name in (*DPO_OPTION_NAMES, *TRAINING_RULES, "num_train_epochs", "max_steps")
            }
        )
        super().__post_init__()
        if self.accelerator_config.dispatch_batches is None:
            # an IterableDataset's batches would be fetched by the main process and concatenated across processes
            # (accelerate's default for one), which the packed layouts' batches of varying rows cannot be; each process
            # reads its own shard of batches instead
            self.accelerator_config.dispatch_batches = False

    def __getstate__(self) -> dict[str, Any]:
        """What pickling records (the Trainer's `torch.save(args)`: training_args.bin in every checkpoint, the output
        and a Hub push): credential fields (`hub_token`) None and every value with credentials masked
        (`pipeline.core.redaction`). The live object keeps its token, and a deep copy keeps it too (`__deepcopy__`)."""
        state = dict(self.__dict__)
        for name, value in state.items():
            clean = None if name in credential_fields() else redact(value)
            if clean is not value and clean != value:  # only what changed: an enum stays an enum
                state[name] = clean
        return state

    def __deepcopy__(self, memo: dict) -> "DPOConfig":
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def policy_init_kwargs(self) -> dict[str, Any]:
        """from_pretrained() keywords of a policy loaded by name."""
        return from_pretrained_kwargs(self, reference=False)

    def reference_init_kwargs(self) -> dict[str, Any]:
        """from_pretrained() keywords of a reference loaded by name (its own, else the policy's)."""
        return from_pretrained_kwargs(self, reference=True)
