"""`DPOConfig`: the Hugging Face `TrainingArguments` plus every DPO option, checked when built."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import TrainingArguments

from .errors import PipelineError
from .losses import check_loss_options
from .rules import at_least, check, greater_than, one_of, within

TRUNCATION_MODES = ("keep_start", "keep_end")
# transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*, warning on the old names; DPOConfig
# takes the reference documentation's names and passes them on under the new ones where the installed transformers
# has them (an older one reads the old names itself)
CHECKPOINTING_NAMES = (("gradient_checkpointing", "activation_checkpointing"),
                       ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))
ON_INVALID_POLICIES = ("error", "drop")


def option(default: Any = None, help: str = "", factory=None):
    """A DPOConfig field with its help text (HfArgumentParser hands field metadata to argparse, so the value
    rules live in OPTION_RULES below the class, not here)."""
    metadata = {"help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Rules of inherited TrainingArguments fields whose bad values would otherwise fail late (inside the
# optimizer or the sampler) or silently (no steps at all).
TRAINING_RULES = {
    "learning_rate": (at_least(0), "a typical DPO rate is 1e-6 (full) or 1e-5 (LoRA)"),
    "per_device_train_batch_size": (at_least(1), ""),
    "per_device_eval_batch_size": (at_least(1), ""),
    "gradient_accumulation_steps": (at_least(1), ""),
    "logging_steps": (greater_than(0), ""),
    "save_steps": (greater_than(0), ""),
    "eval_steps": (greater_than(0), "or null: logging_steps"),
    "warmup_steps": (at_least(0), ""),
    "weight_decay": (at_least(0), ""),
    "max_grad_norm": (at_least(0), ""),
    "save_total_limit": (at_least(1), "or null: keep every checkpoint"),
}


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def field_rules() -> dict[str, tuple]:
    """(rule, fix) of every ruled option: DPOConfig's own fields (from their metadata) and TRAINING_RULES."""
    return {**TRAINING_RULES, **OPTION_RULES}


def check_finite(options: dict[str, Any], name=lambda key: key) -> None:
    """Refuse an infinite or NaN number (or one inside a list, as loss_weights) in any option: no setting means
    .inf or .nan, and one would train to NaN and publish it."""
    for key, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise PipelineError(f"{name(key)} must be a finite number (got {value!r}); .inf and .nan are no setting "
                                    "of any option: give a number, or leave the option out for its default.")


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
        raise PipelineError(f"{name('num_train_epochs')} must be > 0 (got {epochs!r}) unless {name('max_steps')} > 0: "
                            "a run of no steps would publish the untrained model as trained.")
    loss_types = _as_list(options.get("loss_type", []))
    precompute = options.get("precompute_ref_log_probs", False)
    if options.get("use_liger_kernel"):
        if len(loss_types) > 1:
            raise PipelineError(f"use_liger_kernel=True supports a single loss_type only; drop the extra types of "
                                f"{name('loss_type')} or turn off {name('use_liger_kernel')}.")
        if precompute:
            raise PipelineError(f"use_liger_kernel=True is not supported with precompute_ref_log_probs=True; turn off "
                                f"{name('use_liger_kernel')} or {name('precompute_ref_log_probs')}.")
    if options.get("sync_ref_model") and precompute:
        raise PipelineError(f"sync_ref_model=True cannot be combined with precompute_ref_log_probs=True (the reference "
                            f"changes during training); turn off {name('sync_ref_model')} or "
                            f"{name('precompute_ref_log_probs')}.")


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
    output_dir: str | None = field(default="artifacts/train/output")
    learning_rate: float = field(default=1e-6)
    logging_steps: float = field(default=10)
    gradient_checkpointing: bool | None = field(default=True)
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None = on where supported and fp16 is off."})
    remove_unused_columns: bool = field(default=False)

    # model
    model_init_kwargs: dict[str, Any] | None = option(
        None, "Keyword arguments for from_pretrained() of the policy, e.g. {dtype: bfloat16}.")
    ref_model_init_kwargs: dict[str, Any] | None = option(
        None, "Keyword arguments for from_pretrained() of a ref_model given by name; None: model_init_kwargs.")
    trust_remote_code: bool = option(
        False, "Run the custom modelling/tokenizer code of a model loaded by name (only for repositories you trust).")
    disable_dropout: bool = option(True, "Turn dropout off in the policy and the reference.")

    # data
    dataset_num_proc: int | None = option(None, "Processes for dataset tokenization; None: the calling process.")
    on_invalid: str = option(
        "error", "A row that cannot be read or breaks a format rule (or a pre-tokenized row with an empty completion "
        "or a token id outside the model's vocabulary): error: refuse, naming the rows; drop: skip those rows and "
        "report their indices and rules.")
    pad_token: str | None = option(None, "Padding token; default: the tokenizer's pad token, else its eos token.")
    padding_free: bool = option(False, "Pack the batch into one sequence without padding (position_ids restart per sequence).")
    prefix_sharing: bool = option(
        True, "Run each pair's prompt once: prompt, chosen and rejected in one sequence, each completion masked from "
        "the other (a model whose attention cannot take the mask falls back, with a log line); false: chosen and "
        "rejected as two sequences.")
    packing: bool = option(
        True, "Fill each batch row with several pairs (or sequences), up to the longest one's length, instead of "
        "padding every row to it (positions restart per sequence; same numbers); false: one per row.")
    pad_to_multiple_of: int | None = option(None, "Pad sequence lengths to a multiple of this.")
    max_length: int | None = option(1024, "Maximum tokens of prompt + the longer completion; None: no truncation.")
    truncation_mode: str = option("keep_start", "keep_start (cut the completions' ends) or keep_end (deprecated: cut "
                                  "the oldest prompt tokens).")

    # reference
    precompute_ref_log_probs: bool = option(False, "Compute the reference log-probs once before training.")
    precompute_ref_batch_size: int | None = option(None, "Batch size of that pass; None: per_device_eval_batch_size.")
    sync_ref_model: bool = option(False, "TR-DPO: mix the policy into the reference every ref_model_sync_steps.")
    ref_model_mixup_alpha: float = option(0.6, "α of the TR-DPO update ref = α·policy + (1−α)·ref.")
    ref_model_sync_steps: int = option(512, "Optimizer steps between TR-DPO reference updates.")

    # objective
    loss_type: list[str] = option(help="Loss type, or a list of them to combine (see losses.md).",
                                  factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = option(None, "Weights of the combined loss types; None: all 1.0.")
    beta: float = option(0.1, "β: strength of the KL constraint (reciprocal margin for hinge).")
    f_divergence_type: str = option("reverse_kl", "reverse_kl, forward_kl, js_divergence or alpha_divergence.")
    f_alpha_divergence_coef: float = option(0.5, "Coefficient a of the alpha divergence.")
    label_smoothing: float = option(0.0, "ε: label-flip rate (robust, in [0, 0.5)), smoothing (exo_pair, in (0, 1); aot).")
    use_weighting: bool = option(False, "WPO weighting of each pair by its on-policy probability.")
    ld_alpha: float | None = option(None, "LD-DPO α for the tokens past the shorter completion; None: plain sums.")
    discopop_tau: float = option(0.05, "τ of the DiscoPOP loss.")
    router_aux_loss_coef: float = option(
        0.001, "Weight of a mixture-of-experts model's router load-balancing loss, added to the objective when the "
        "model returns router logits (config.output_router_logits).")

    # speed and memory
    activation_offloading: bool = option(False, "Offload activations to the CPU during the forward pass.")

    # faults
    max_nonfinite_steps: int = option(
        3, "Stop training when the loss or the gradient norm is NaN or infinite for this many optimizer steps in a "
        "row (no checkpoint is saved at such a step, nothing is published).")

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in _as_list(self.loss_weights)]
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
        check_dpo_options({name: getattr(self, name) for name in (*DPO_OPTION_NAMES, *TRAINING_RULES, "num_train_epochs",
                                                                  "max_steps")})
        super().__post_init__()
        if self.accelerator_config.dispatch_batches is None:
            # an IterableDataset's batches would be fetched by the main process and concatenated across processes
            # (accelerate's default for one), which the packed layouts' batches of varying rows cannot be; each process
            # reads its own shard of batches instead
            self.accelerator_config.dispatch_batches = False

    def __getstate__(self) -> dict[str, Any]:
        """What pickling records (the Trainer's `torch.save(args)`: training_args.bin in every checkpoint, the output
        and a Hub push): credential fields (`hub_token`) None and every value with credentials masked
        (`pipeline.redaction`). The live object keeps its token, and a deep copy keeps it too (`__deepcopy__`)."""
        from .redaction import credential_fields, redact

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


def from_pretrained_kwargs(options: Any, reference: bool) -> dict[str, Any]:
    """The from_pretrained() keywords of the policy or of a reference loaded by name, from a DPOConfig or a
    mapping of its options: a reference without ref_model_init_kwargs takes the policy's; remote code only
    with trust_remote_code."""
    get = options.get if isinstance(options, dict) else lambda key: getattr(options, key)
    own = get("ref_model_init_kwargs") if reference and get("ref_model_init_kwargs") is not None \
        else get("model_init_kwargs")
    return {"trust_remote_code": bool(get("trust_remote_code")), **(own or {})}


# The value rule of each DPOConfig option that has one: (rule, the fix to suggest). params.yaml's check
# uses the same table, so the API and the pipeline refuse the same values with the same words.
OPTION_RULES = {
    "max_nonfinite_steps": (at_least(1), ""),
    "dataset_num_proc": (at_least(1), "or null"),
    "on_invalid": (one_of(*ON_INVALID_POLICIES), ""),
    "pad_to_multiple_of": (at_least(1), "or null"),
    "max_length": (at_least(2), "or null for no truncation"),
    "truncation_mode": (one_of(*TRUNCATION_MODES), ""),
    "precompute_ref_batch_size": (at_least(1), "or null: per_device_eval_batch_size"),
    "ref_model_mixup_alpha": (within(0, 1), ""),
    "ref_model_sync_steps": (at_least(1), ""),
    "beta": (greater_than(0), "try 0.1"),
    "ld_alpha": (within(0, 1), "or null"),
    "discopop_tau": (greater_than(0), "the DiscoPOP paper uses 0.05"),
    "router_aux_loss_coef": (at_least(0), ""),
}

DPO_OPTION_NAMES = tuple(
    name for name in DPOConfig.__dataclass_fields__ if name not in TrainingArguments.__dataclass_fields__
) + ("use_liger_kernel",)


def dpo_default(name: str) -> Any:
    """The default of a DPOConfig option: its one home is the dataclass field."""
    f = DPOConfig.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default
