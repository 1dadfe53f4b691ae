"""The DPO objective of a batch through Liger Kernel's fused linear DPO loss (`use_liger_kernel=True`).

`liger_kernel.chunked_loss.LigerFusedLinearDPOLoss` takes the last hidden states and the output layer's weight
(and bias) of the policy and of the reference, and the target ids with ignored positions set to IGNORE_INDEX; it
runs the output layer, the log-softmax, the loss and its gradients a few pairs at a time, so it never holds the
batch's logits. Both models run as on our own path (`pipeline.model.head.forward` with `logits_to_keep=1`, a hook on
the body for its hidden states; the reference inside `Reference.context()`, without gradient). Their hidden states
are gathered at the completion positions only and left-aligned per sequence (`[2N, Lc, H]`, Lc the longest
completion, zeros after each one with IGNORE_INDEX targets): the output layer never runs on prompt positions, and
Liger sees the same tensors whatever layout the collator gave the model (`pipeline.model.head.completion_positions`).

What Liger computes, against losses.md (liger-kernel >= 0.8.1):
- c_i, r_i: summed completion log-probs (`average_log_prob=False`), chosen rows first as in our collator.
- the ten loss types of LIGER_LOSS_TYPES, per pair as in losses.md on the raw log-ratios ρ± (no f-divergence
  transform, no LD-DPO sums, no WPO weights), averaged over the pairs; `beta`, `label_smoothing`, `discopop_tau`
  as ours. (Liger's discopop computes m·exp(−z) directly, so a pair with z below about −88 gives inf/nan in fp32
  where ours stays finite.)
- rewards: βρ±, the same as ours; `rewards/*` and `logps/*` are taken from its outputs.
- `*_logits_mean`: the sum of every logit of the side's `[N, Lc, V]` block over N·Lc·V. That is not our
  `logits/*` (the vocabulary-mean logit averaged over completion tokens); with the empty slots' hidden states at 0
  their logits are the bias, so `completion_logit_sum` recovers ours exactly from it.
- entropy and token accuracy: not computed, so `entropy` and `mean_token_accuracy` are not logged on this route (a
  second pass over the vocabulary would give back what the fused loss saves).

What it cannot express is refused when the trainer is built (`check_liger_route`). CUDA runs the loss under
torch.compile (`compiled=True`); other devices run it eagerly, and without Liger's model kernels
(`model_kernel_config`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.errors import PipelineError
from pipeline.model.head import (
    OutputLayer,
    captured_output,
    completion_positions,
    forward,
    last_hidden_state,
    output_layer,
)
from pipeline.objective.losses import LOSS_TYPES
from pipeline.objective.reference import Reference

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # target of the positions that are not completion tokens
# the loss types whose Liger arithmetic is losses.md's (checked against the installed package in tests/test_liger.py)
LIGER_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
TURN_OFF = "turn off use_liger_kernel (the default route computes it)"


@dataclass(frozen=True)
class LigerDPO:
    """What one batch gives the trainer: the objective, its terms (as `losses.dpo_objective` names them), and the
    metric values, detached: per-pair log-probs and rewards ([N]) and the logits/* numerators and denominators."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logit_sum: torch.Tensor  # Σ over chosen completion tokens of the vocabulary-mean logit
    rejected_logit_sum: torch.Tensor
    chosen_tokens: torch.Tensor  # completion tokens of the chosen side
    rejected_tokens: torch.Tensor


# ---- what the route cannot express: refused when the trainer is built ----------------------------------


def check_liger_route(args: Any, model: torch.nn.Module, reference: Reference, datasets: Iterable = ()) -> None:
    """Refuse, with the option and the fix, what `liger_dpo_loss` cannot compute as losses.md defines it (the
    documented constraints, one loss type and no precomputed reference, are DPOConfig's)."""
    loss_type = args.loss_type[0]
    if loss_type not in LIGER_LOSS_TYPES:
        raise PipelineError(
            f"use_liger_kernel=True does not support loss_type {loss_type!r} (Liger's fused DPO loss "
            f"has {', '.join(LIGER_LOSS_TYPES)}); pick one of those or {TURN_OFF}."
        )
    if args.f_divergence_type != "reverse_kl" and "f_divergence_type" in LOSS_TYPES[loss_type].settings:
        raise PipelineError(
            f"use_liger_kernel=True does not support f_divergence_type={args.f_divergence_type!r} "
            f"(Liger's loss reads the raw log-ratios); set f_divergence_type='reverse_kl' or {TURN_OFF}."
        )
    if args.use_weighting:
        raise PipelineError(
            f"use_liger_kernel=True does not support use_weighting=True (WPO weights need the "
            f"policy's full distribution, which the fused loss does not return); turn off "
            f"use_weighting or {TURN_OFF}."
        )
    if args.ld_alpha is not None:
        raise PipelineError(
            f"use_liger_kernel=True does not support ld_alpha (Liger sums every completion token "
            f"alike); set ld_alpha=None or {TURN_OFF}."
        )
    for dataset in datasets:
        if "ref_chosen_logps" in (getattr(dataset, "column_names", None) or []):
            raise PipelineError(
                f"use_liger_kernel=True computes the reference log-probs online, but the dataset "
                f"carries precomputed ones (ref_chosen_logps); drop those columns or {TURN_OFF}."
            )
    for name, part in (("the model", model), ("the reference model", reference.model)):
        if part is None:
            raise PipelineError(f"use_liger_kernel=True needs a reference model to run; {TURN_OFF}.")
        layer = output_layer(part)
        if layer is None:
            raise PipelineError(
                f"use_liger_kernel=True needs {name}'s logits to be its output layer applied to its "
                f"last hidden states, and they are not (see the log line of pipeline.model.head); {TURN_OFF}."
            )
        if type(layer.head) is not torch.nn.Linear:
            raise PipelineError(
                f"use_liger_kernel=True needs {name}'s output layer to be a plain torch.nn.Linear, "
                f"not {type(layer.head).__name__} (an adapter on lm_head: leave lm_head out of the "
                f"adapter's target_modules/modules_to_save); or {TURN_OFF}."
            )


def model_kernel_config(args: Any) -> dict[str, bool] | None:
    """The `liger_kernel_config` under which transformers' Trainer patches Liger's model kernels (RMSNorm, RoPE,
    SwiGLU, ...) into the policy when use_liger_kernel is set: the user's on CUDA; elsewhere every kernel off, as
    they are Triton kernels, GPU only (the fused DPO loss runs on any device)."""
    if args.device.type == "cuda":
        return args.liger_kernel_config
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    logger.warning(
        "use_liger_kernel=True on %s: Liger's model kernels need a GPU and stay off; the fused DPO loss "
        "runs without torch.compile.",
        args.device.type,
    )
    return {
        name: False
        for apply in MODEL_TYPE_TO_APPLY_LIGER_FN.values()
        for name, p in inspect.signature(apply).parameters.items()
        if isinstance(p.default, bool)
    }


# ---- the loss --------------------------------------------------------------------------------------


def liger_dpo_loss(
    model: torch.nn.Module, reference: Reference, inputs: dict, args: Any, chunk_tokens: int | None = None
) -> LigerDPO:
    """The objective of a collated batch (`pipeline.model.collator`, any layout) through Liger's fused linear DPO loss,
    with the options `check_liger_route` allows: `loss_weights[0]` times Liger's loss, plus a mixture-of-experts
    router's load-balancing loss as on the default route. `chunk_tokens` bounds the positions whose logits live
    at once (None: `pipeline.model.head.LOGITS_PER_CHUNK` logits); Liger's chunks are whole pairs, at least one."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    mask = inputs["completion_mask"][:, 1:].bool()
    lengths = mask.sum(-1)
    n, width = mask.shape[0] // 2, max(1, int(lengths.max()))
    policy = output_layer(model)
    hidden, labels, outputs = completion_hidden_states(model, policy, inputs, mask)
    with torch.no_grad(), reference.context():
        ref_layer = output_layer(reference.model)
        ref_hidden, _, _ = completion_hidden_states(reference.model, ref_layer, inputs, mask)
    weight, bias = policy.head.weight, policy.head.bias
    if not torch.is_grad_enabled():  # evaluation: nothing for Liger to differentiate
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    fused = LigerFusedLinearDPOLoss(
        ignore_index=IGNORE_INDEX,
        beta=args.beta,
        compute_nll_loss=False,
        compiled=hidden.device.type == "cuda",
        use_ref_model=True,
        average_log_prob=False,
        loss_type=args.loss_type[0],
        label_smoothing=args.label_smoothing,
        discopop_tau=args.discopop_tau,
        chunk_size=max(1, policy.chunk_tokens(chunk_tokens) // (2 * width)),
    )
    ref_bias = None if ref_layer.head.bias is None else ref_layer.head.bias.detach()
    loss, (chosen_logps, rejected_logps, chosen_mean, rejected_mean, _nll, chosen_rewards, rejected_rewards) = fused(
        weight,
        left_aligned(hidden, lengths, width),
        left_aligned(labels, lengths, width, IGNORE_INDEX),
        bias,
        left_aligned(ref_hidden, lengths, width),
        ref_layer.head.weight.detach(),
        ref_bias,
    )

    weights = args.loss_weights or [1.0]
    total, terms = weights[0] * loss, {args.loss_type[0]: loss.detach()}
    aux_loss = getattr(outputs, "aux_loss", None)
    if aux_loss is not None:  # a mixture-of-experts router's load-balancing loss
        total = total + args.router_aux_loss_coef * aux_loss
        terms["aux_loss"] = aux_loss.detach()
    chosen_tokens, rejected_tokens = lengths[:n].sum(), lengths[n:].sum()
    return LigerDPO(
        total,
        terms,
        chosen_logps.detach(),
        rejected_logps.detach(),
        chosen_rewards.detach(),
        rejected_rewards.detach(),
        completion_logit_sum(chosen_mean, n * width, chosen_tokens, bias),
        completion_logit_sum(rejected_mean, n * width, rejected_tokens, bias),
        chosen_tokens,
        rejected_tokens,
    )


def completion_hidden_states(model: torch.nn.Module, layer: OutputLayer, inputs: dict, mask: torch.Tensor):
    """The model's last hidden states at the completion positions of `mask` ([2N, L-1]; row-major, `[K, H]`),
    their labels ([K]), and the model's outputs (for a router's aux_loss). The model computes only its last
    position's logits."""
    with captured_output(layer.body) as captured:
        outputs = forward(model, inputs, logits_to_keep=1)
    hidden = last_hidden_state(captured)
    where, labels = completion_positions(inputs, mask)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, where), labels, outputs


def left_aligned(values: torch.Tensor, lengths: torch.Tensor, width: int, fill=0) -> torch.Tensor:
    """Values listed sequence after sequence (`[K, ...]`, sequence i holding `lengths[i]` of them) laid out
    `[sequences, width, ...]`: each sequence's values first, `fill` after them (differentiable)."""
    slots = torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)
    out = values.new_full((len(lengths), width, *values.shape[1:]), fill)
    return out.masked_scatter(slots.view(*slots.shape, *[1] * (values.dim() - 1)), values)


def completion_logit_sum(
    logits_mean: torch.Tensor, slots: int, tokens: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Σ over one side's completion tokens of the vocabulary-mean logit (the numerator of losses.md's logits/*),
    from Liger's mean of every logit of that side's `[N, Lc, V]` block: its `slots` = N·Lc positions hold the
    completion tokens and, after them, zero hidden states, whose logits are the bias."""
    total = logits_mean.detach().double() * slots
    if bias is not None:
        total = total - (slots - tokens) * bias.detach().double().mean()
    return total
