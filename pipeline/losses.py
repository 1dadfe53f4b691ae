"""DPO objectives as pure tensor functions, term by term as in the spec's losses.md.

Inputs are per-pair summed log-probabilities (policy and reference); outputs are per-pair losses ℓ_i
and their weighted batch mean. Every log σ goes through `F.logsigmoid` for stability.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Losses whose ℓ is indexed by sorted rank, not by pair, so per-pair weights cannot apply.
_SORTED_LOSSES = ("aot", "aot_unpaired")


def f_divergence_score(
    log_ratio: Tensor, f_divergence_type: str = "reverse_kl", alpha_coef: float = 0.5
) -> Tensor:
    """g(ρ) of the f-DPO table: the score that replaces the raw log-ratio."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return -torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if alpha_coef == 1:
            return log_ratio  # exp((a-1)ρ)/(a-1) is undefined at a = 1; the spec falls back to ρ
        # Cap the exponent so exp() stays finite in the input's precision.
        cap = 11.0 if log_ratio.dtype == torch.float16 else 80.0
        return torch.exp(torch.clamp((alpha_coef - 1) * log_ratio, max=cap)) / (alpha_coef - 1)
    raise ValueError(
        f"unknown f_divergence_type {f_divergence_type!r}; choose from {list(F_DIVERGENCE_TYPES)}."
    )


def _smoothed_sigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the label-smoothed logistic loss (used by AOT)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sorted_gap(a: Tensor, b: Tensor) -> Tensor:
    """sort(a) − sort(b), both ascending; stable so tied values keep a deterministic order."""
    return torch.sort(a, stable=True).values - torch.sort(b, stable=True).values


def _per_token(scores: Tensor, lengths: Tensor | None, loss_type: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths.")
    return scores / lengths.to(scores.dtype).clamp(min=1)


def pair_losses(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    sft_nll: Tensor | None = None,
) -> Tensor:
    """Per-pair loss ℓ_i ([N]) for one loss type, exactly as in the losses.md table.

    For aot/aot_unpaired the entries are indexed by sorted rank k rather than by pair.
    """
    eps = label_smoothing
    rho_pos = chosen_logps - ref_chosen_logps
    rho_neg = rejected_logps - ref_rejected_logps
    s_pos = f_divergence_score(rho_pos, f_divergence_type, f_alpha_divergence_coef)
    s_neg = f_divergence_score(rho_neg, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_pos - s_neg)  # βΔ

    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        pos = _per_token(s_pos, chosen_lengths, loss_type)
        neg = _per_token(s_neg, rejected_lengths, loss_type)
        return (pos - neg - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        if not 0 < eps < 1:
            raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (got {eps}); 1e-3 is recommended.")
        # KL between the model's pair distribution σ(±βΔ) and the smoothed label (1−ε, ε).
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if loss_type == "nca_pair":
        return (-F.logsigmoid(beta * s_pos) - 0.5 * F.logsigmoid(-beta * s_pos)
                - 0.5 * F.logsigmoid(-beta * s_neg))
    if loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"robust needs label_smoothing in [0, 0.5) (got {eps}).")
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * s_pos) - F.logsigmoid(-beta * s_neg)
    if loss_type == "sppo_hard":
        return (s_pos - 1 / (2 * beta)) ** 2 + (s_neg + 1 / (2 * beta)) ** 2
    if loss_type == "aot":
        delta = _sorted_gap(chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps)
        return _smoothed_sigmoid_loss(beta * delta, eps)
    if loss_type == "aot_unpaired":
        return _smoothed_sigmoid_loss(beta * _sorted_gap(rho_pos, rho_neg), eps)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * rho_pos)) + torch.sigmoid(beta * rho_neg)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_pos) + (1 - torch.sigmoid(z))
    if loss_type == "discopop":
        # m·exp(−z) written as exp(log σ(z/τ) − z): same value, but no 0·inf = nan for very negative z.
        m_bar = torch.sigmoid(-z / discopop_tau)  # 1 − m
        return m_bar * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    if loss_type == "sft":
        if sft_nll is None:
            raise ValueError("loss_type 'sft' needs sft_nll (mean token NLL of the chosen completions).")
        return sft_nll.expand_as(chosen_logps)
    if loss_type == "sigmoid_norm":
        pos = _per_token(s_pos, chosen_lengths, loss_type)
        neg = _per_token(s_neg, rejected_lengths, loss_type)
        return -F.logsigmoid(beta * (pos - neg))
    raise ValueError(f"unknown loss_type {loss_type!r}; choose from {list(LOSS_TYPES)}.")


def dpo_objective(
    loss_types: list[str] | str,
    loss_weights: list[float] | None,
    pair_weights: Tensor | None = None,
    **pair_loss_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total Σ_k w_k · mean_i(pair_weights_i · ℓ_i^(k)), and each term's mean keyed by loss type."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not types:
        raise ValueError("loss_types is empty; give at least one, e.g. ['sigmoid'].")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; choose from {list(LOSS_TYPES)}.")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries but loss_type has {len(types)}; "
            "give one weight per loss type."
        )
    if pair_weights is not None and any(t in _SORTED_LOSSES for t in types):
        raise ValueError("per-pair (WPO) weights cannot be used with aot/aot_unpaired: sorting breaks the pairing.")

    total, terms = 0.0, {}
    for loss_type, weight in zip(types, weights):
        losses = pair_losses(loss_type, **pair_loss_kwargs)
        if pair_weights is not None:
            losses = losses * pair_weights
        terms[loss_type] = losses.mean()
        total = total + weight * terms[loss_type]
    return total, terms


def implicit_rewards(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """(βρ⁺, βρ⁻) on the raw log-ratios (never f-transformed), detached: for the rewards/* metrics."""
    return (
        (beta * (chosen_logps - ref_chosen_logps)).detach(),
        (beta * (rejected_logps - ref_rejected_logps)).detach(),
    )
