"""`DPOConfig`: the Hugging Face `TrainingArguments` plus every DPO option, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .errors import PipelineError

LOSS_TYPE_NAMES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCE_NAMES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
TRUNCATION_MODES = ("keep_start", "keep_end")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def validate_dpo_options(opts: dict[str, Any]) -> None:
    """The validation rules of losses.md that need only the options themselves.

    Shared by `DPOConfig.__post_init__` and the params.yaml check of every stage, so a bad
    combination fails before any model is loaded or data read.
    """
    beta = opts.get("beta", 0.1)
    if not isinstance(beta, (int, float)) or beta <= 0:
        raise PipelineError(f"beta must be > 0 (got {beta!r}); try beta=0.1.")
    loss_types = _as_list(opts.get("loss_type", ["sigmoid"]))
    unknown = [t for t in loss_types if t not in LOSS_TYPE_NAMES]
    if unknown:
        raise PipelineError(f"unknown loss_type {unknown}; choose from {list(LOSS_TYPE_NAMES)}.")
    if not loss_types:
        raise PipelineError("loss_type is empty; give at least one, e.g. loss_type=['sigmoid'].")
    weights = opts.get("loss_weights")
    if weights is not None and len(_as_list(weights)) != len(loss_types):
        raise PipelineError(
            f"loss_weights has {len(_as_list(weights))} entries but loss_type has {len(loss_types)} "
            f"({loss_types}); give one weight per loss type."
        )
    f_type = opts.get("f_divergence_type", "reverse_kl")
    if f_type not in F_DIVERGENCE_NAMES:
        raise PipelineError(f"unknown f_divergence_type {f_type!r}; choose from {list(F_DIVERGENCE_NAMES)}.")
    eps = opts.get("label_smoothing", 0.0)
    if "exo_pair" in loss_types and not eps > 0:
        raise PipelineError("loss_type 'exo_pair' needs label_smoothing > 0; the EXO authors recommend 1e-3.")
    if "robust" in loss_types and not 0 <= eps < 0.5:
        raise PipelineError(f"loss_type 'robust' needs label_smoothing in [0, 0.5) (got {eps}); it is the label-flip rate.")
    ld_alpha = opts.get("ld_alpha")
    if ld_alpha is not None and not 0 <= ld_alpha <= 1:
        raise PipelineError(f"ld_alpha must be in [0, 1] or None (got {ld_alpha}).")
    if opts.get("use_weighting") and {"aot", "aot_unpaired"} & set(loss_types):
        raise PipelineError("use_weighting=True is not supported with loss_type 'aot'/'aot_unpaired' "
                            "(sorting breaks the pairing); turn off use_weighting or pick another loss.")
    if opts.get("truncation_mode", "keep_start") not in TRUNCATION_MODES:
        raise PipelineError(f"truncation_mode must be one of {list(TRUNCATION_MODES)} (got {opts.get('truncation_mode')!r}).")
    precompute = opts.get("precompute_ref_log_probs", False)
    if opts.get("use_liger_kernel"):
        if len(loss_types) > 1:
            raise PipelineError("use_liger_kernel=True supports a single loss_type only; drop the extra loss types or use_liger_kernel.")
        if precompute:
            raise PipelineError("use_liger_kernel=True is not supported with precompute_ref_log_probs=True; turn one off.")
    if opts.get("sync_ref_model") and precompute:
        raise PipelineError("sync_ref_model=True cannot be combined with precompute_ref_log_probs=True "
                            "(the reference changes during training); turn one off.")
    alpha = opts.get("ref_model_mixup_alpha", 0.6)
    if not 0 <= alpha <= 1:
        raise PipelineError(f"ref_model_mixup_alpha must be in [0, 1] (got {alpha}).")
    if opts.get("ref_model_sync_steps", 512) < 1:
        raise PipelineError("ref_model_sync_steps must be >= 1.")
    max_length = opts.get("max_length", 1024)
    if max_length is not None and max_length < 2:
        raise PipelineError(f"max_length must be >= 2 or None (got {max_length}).")


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
    model_init_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Keyword arguments for from_pretrained() of the policy."})
    ref_model_init_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Keyword arguments for from_pretrained() of a ref_model given by name. None: the same as model_init_kwargs."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the policy and the reference."})

    # data
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset tokenization."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token; default: the tokenizer's pad token, else its eos token."})
    padding_free: bool = field(default=False, metadata={"help": "Pack the batch into one sequence without padding (needs flash attention)."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad sequence lengths to a multiple of this."})
    max_length: int | None = field(default=1024, metadata={"help": "Maximum tokens of prompt + completion; None = no truncation."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start (cut the end) or keep_end (deprecated: cut the start)."})

    # reference
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute reference log-probs once before training."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Batch size of that pass; default per_device_eval_batch_size."})
    sync_ref_model: bool = field(default=False, metadata={"help": "TR-DPO: mix the policy into the reference every ref_model_sync_steps."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "α of the TR-DPO update ref = α·policy + (1−α)·ref."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Optimizer steps between TR-DPO reference updates."})

    # objective
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": "Loss type, or a list of them to combine."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the combined loss types; default all 1.0."})
    beta: float = field(default=0.1, metadata={"help": "β: strength of the KL constraint (reciprocal margin for hinge)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "reverse_kl, forward_kl, js_divergence or alpha_divergence."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "Coefficient a of the alpha divergence."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε: label-flip rate (robust), smoothing (exo_pair, aot)."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO weighting of each pair by its on-policy probability."})
    ld_alpha: float | None = field(default=None, metadata={"help": "LD-DPO α for the tokens past the shorter completion; None = plain sums."})
    discopop_tau: float = field(default=0.05, metadata={"help": "τ of the DiscoPOP loss."})

    # speed and memory
    activation_offloading: bool = field(default=False, metadata={"help": "Offload activations to the CPU during the forward pass."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in _as_list(self.loss_weights)]
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_supported()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
        validate_dpo_options({name: getattr(self, name) for name in DPO_OPTION_NAMES})
        super().__post_init__()


DPO_OPTION_NAMES = tuple(
    name for name in DPOConfig.__dataclass_fields__ if name not in TrainingArguments.__dataclass_fields__
) + ("use_liger_kernel",)
