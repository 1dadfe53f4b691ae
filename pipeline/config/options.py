"""The DPO options as plain data: each option's default, help and value rule, in one table.

`DPOConfig` (`pipeline.config.dpo_config`) declares its fields from this table, and params.yaml's check reads
it without building a `DPOConfig`, so a stage that only reads options never imports the trainer's
configuration, and the API and the pipeline refuse the same values with the same words.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config.rules import at_least, greater_than, one_of, within
from pipeline.core.errors import PipelineError

TRUNCATION_MODES = ("keep_start", "keep_end")
ON_INVALID_POLICIES = ("error", "drop")


@dataclass(frozen=True)
class Option:
    """A DPO option: its default (copied on each read), help text, and value rule with the fix to suggest."""

    default: Any
    help: str
    rule: Callable | None = None
    fix: str = ""

    def default_value(self) -> Any:
        return copy.deepcopy(self.default)


DPO_OPTIONS: dict[str, Option] = {
    "model_init_kwargs": Option(None, "Keyword arguments for from_pretrained() of the policy, e.g. {dtype: bfloat16}."),
    "ref_model_init_kwargs": Option(
        None, "Keyword arguments for from_pretrained() of a ref_model given by name; None: model_init_kwargs."
    ),
    "trust_remote_code": Option(
        False, "Run the custom modelling/tokenizer code of a model loaded by name (only for repositories you trust)."
    ),
    "disable_dropout": Option(True, "Turn dropout off in the policy and the reference."),
    "dataset_num_proc": Option(
        None, "Processes for dataset tokenization; None: the calling process.", rule=at_least(1), fix="or null"
    ),
    "on_invalid": Option(
        "error",
        "A row that cannot be read or breaks a format rule (or a pre-tokenized row with an empty completion "
        "or a token id outside the model's vocabulary): error: refuse, naming the rows; drop: skip those rows "
        "and report their indices and rules.",
        rule=one_of(*ON_INVALID_POLICIES),
    ),
    "pad_token": Option(None, "Padding token; default: the tokenizer's pad token, else its eos token."),
    "padding_free": Option(
        False, "Pack the batch into one sequence without padding (position_ids restart per sequence)."
    ),
    "prefix_sharing": Option(
        True,
        "Run each pair's prompt once: prompt, chosen and rejected in one sequence, each completion masked "
        "from the other (a model whose attention cannot take the mask falls back, with a log line); false: "
        "chosen and rejected as two sequences.",
    ),
    "packing": Option(
        True,
        "Fill each batch row with several pairs (or sequences), up to the longest one's length, instead of "
        "padding every row to it (positions restart per sequence; same numbers); false: one per row.",
    ),
    "pad_to_multiple_of": Option(None, "Pad sequence lengths to a multiple of this.", rule=at_least(1), fix="or null"),
    "max_length": Option(
        1024,
        "Maximum tokens of prompt + the longer completion; None: no truncation.",
        rule=at_least(2),
        fix="or null for no truncation",
    ),
    "truncation_mode": Option(
        "keep_start",
        "keep_start (cut the completions' ends) or keep_end (deprecated: cut the oldest prompt tokens).",
        rule=one_of(*TRUNCATION_MODES),
    ),
    "precompute_ref_log_probs": Option(False, "Compute the reference log-probs once before training."),
    "precompute_ref_batch_size": Option(
        None,
        "Batch size of that pass; None: per_device_eval_batch_size.",
        rule=at_least(1),
        fix="or null: per_device_eval_batch_size",
    ),
    "sync_ref_model": Option(False, "TR-DPO: mix the policy into the reference every ref_model_sync_steps."),
    "ref_model_mixup_alpha": Option(0.6, "α of the TR-DPO update ref = α·policy + (1−α)·ref.", rule=within(0, 1)),
    "ref_model_sync_steps": Option(512, "Optimizer steps between TR-DPO reference updates.", rule=at_least(1)),
    "loss_type": Option(["sigmoid"], "Loss type, or a list of them to combine (see docs/losses.md)."),
    "loss_weights": Option(None, "Weights of the combined loss types; None: all 1.0."),
    "beta": Option(
        0.1, "β: strength of the KL constraint (reciprocal margin for hinge).", rule=greater_than(0), fix="try 0.1"
    ),
    "f_divergence_type": Option("reverse_kl", "reverse_kl, forward_kl, js_divergence or alpha_divergence."),
    "f_alpha_divergence_coef": Option(0.5, "Coefficient a of the alpha divergence."),
    "label_smoothing": Option(0.0, "ε: label-flip rate (robust, in [0, 0.5)), smoothing (exo_pair, in (0, 1); aot)."),
    "use_weighting": Option(False, "WPO weighting of each pair by its on-policy probability."),
    "ld_alpha": Option(
        None, "LD-DPO α for the tokens past the shorter completion; None: plain sums.", rule=within(0, 1), fix="or null"
    ),
    "discopop_tau": Option(0.05, "τ of the DiscoPOP loss.", rule=greater_than(0), fix="the DiscoPOP paper uses 0.05"),
    "router_aux_loss_coef": Option(
        0.001,
        "Weight of a mixture-of-experts model's router load-balancing loss, added to the objective when the "
        "model returns router logits (config.output_router_logits).",
        rule=at_least(0),
    ),
    "activation_offloading": Option(False, "Offload activations to the CPU during the forward pass."),
    "max_nonfinite_steps": Option(
        3,
        "Stop training when the loss or the gradient norm is NaN or infinite for this many optimizer steps in "
        "a row (no checkpoint is saved at such a step, nothing is published).",
        rule=at_least(1),
    ),
}

# the TrainingArguments fields DPOConfig gives another default (the reference documentation's)
TRAINING_DEFAULTS = {
    "output_dir": "artifacts/train/output",
    "learning_rate": 1e-6,
    "logging_steps": 10,
    "gradient_checkpointing": True,
    "bf16": None,
    "remove_unused_columns": False,
}
# params.yaml's hub section, and the Python API's defaults too (`pipeline.store.hub.configure_network`)
HUB_TIMEOUT_S, HUB_TRIES = 30.0, 3
# what DPOConfig adds to those defaults' meaning
BF16_HELP = "bf16 mixed precision; None = on where supported and fp16 is off."

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

# every DPO option, with the one TrainingArguments field the DPO documentation adds to them
DPO_OPTION_NAMES = (*DPO_OPTIONS, "use_liger_kernel")


def field_rules() -> dict[str, tuple]:
    """(rule, fix) of every ruled option: the DPO options' and TRAINING_RULES."""
    return {**TRAINING_RULES, **{name: (o.rule, o.fix) for name, o in DPO_OPTIONS.items() if o.rule}}


def check_finite(options: dict[str, Any], name=lambda key: key) -> None:
    """Refuse an infinite or NaN number (or one inside a list, as loss_weights) in any option: no setting means
    .inf or .nan, and one would train to NaN and publish it."""
    for key, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise PipelineError(
                    f"{name(key)} must be a finite number (got {value!r}); .inf and .nan are no setting "
                    "of any option: give a number, or leave the option out for its default."
                )


def from_pretrained_kwargs(options: Any, reference: bool) -> dict[str, Any]:
    """The from_pretrained() keywords of the policy or of a reference loaded by name, from a DPOConfig or a
    mapping of its options: a reference without ref_model_init_kwargs takes the policy's; remote code only
    with trust_remote_code."""
    get = options.get if isinstance(options, dict) else lambda key: getattr(options, key)
    own = (
        get("ref_model_init_kwargs")
        if reference and get("ref_model_init_kwargs") is not None
        else get("model_init_kwargs")
    )
    return {"trust_remote_code": bool(get("trust_remote_code")), **(own or {})}
