"""DPO objectives: a registry of docs/losses.md's table, one small pure function per loss type.

Inputs are per-pair summed log-probabilities (policy and reference, `PairLogps`); `dpo_objective` computes
the notation of docs/losses.md once (`Scores`: ρ±, s± = g(ρ±), z = βΔ), hands it to each loss type's
function (`pair_losses`: the per-pair losses ℓ_i) and combines the types. Every log σ goes through
`F.logsigmoid`. What configuration knows of each type (settings read, value rules) is plain data in
`pipeline.config.loss_options`, which checks options without importing this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config.loss_options import LOSS_OPTIONS, LossOptions, check_loss_options


@dataclass(frozen=True)
class PairLogps:
    """Per-pair tensors [N] of one batch: policy and reference log-probability sums, and what some losses add."""

    chosen: Tensor  # c_i
    rejected: Tensor  # r_i
    ref_chosen: Tensor  # c_i^ref
    ref_rejected: Tensor  # r_i^ref
    chosen_lengths: Tensor | None = None  # |y⁺_i| completion tokens (ipo, sigmoid_norm)
    rejected_lengths: Tensor | None = None  # |y⁻_i|
    sft_nll: Tensor | None = None  # scalar: mean token NLL of the chosen completions (sft)


@dataclass(frozen=True)
class LossSettings:
    """The DPOConfig options the objective reads. No defaults: their one home is DPOConfig."""

    beta: float  # β
    label_smoothing: float  # ε
    f_divergence_type: str
    f_alpha_divergence_coef: float  # a
    discopop_tau: float  # τ

    @classmethod
    def of(cls, options: Any) -> LossSettings:
        """From a DPOConfig (attributes) or a Mapping of option names (keys)."""
        get = options.__getitem__ if isinstance(options, Mapping) else lambda key: getattr(options, key)
        return cls(**{f.name: get(f.name) for f in fields(cls)})


# ---- f-divergence transform g(ρ, a) (f-DPO, arXiv 2309.16240) -------------------------------------


def _alpha_divergence(rho: Tensor, a: float) -> Tensor:
    if a == 1:
        return rho  # exp((a−1)ρ)/(a−1) is undefined at a = 1; the spec falls back to ρ
    cap = 11.0 if rho.dtype == torch.float16 else 80.0  # keeps exp() finite in the input's precision
    return torch.exp(torch.clamp((a - 1) * rho, max=cap)) / (a - 1)


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda rho, a: rho,
    "forward_kl": lambda rho, a: -torch.exp(-rho),
    "js_divergence": lambda rho, a: F.logsigmoid(rho),
    "alpha_divergence": _alpha_divergence,
}


def f_divergence_score(log_ratio: Tensor, f_divergence_type: str, alpha_coef: float) -> Tensor:
    """g(ρ) of the f-DPO table: the score that replaces the raw log-ratio."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose from {list(F_DIVERGENCES)}.")
    return F_DIVERGENCES[f_divergence_type](log_ratio, alpha_coef)


# ---- the notation, computed once per batch --------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """What the loss functions read: the log-probs, ρ± = policy − reference, s± = g(ρ±), z = βΔ."""

    logps: PairLogps
    rho_pos: Tensor
    rho_neg: Tensor
    s_pos: Tensor
    s_neg: Tensor
    z: Tensor

    @classmethod
    def of(cls, logps: PairLogps, o: LossSettings) -> Scores:
        rho_pos = logps.chosen - logps.ref_chosen
        rho_neg = logps.rejected - logps.ref_rejected
        s_pos = f_divergence_score(rho_pos, o.f_divergence_type, o.f_alpha_divergence_coef)
        s_neg = f_divergence_score(rho_neg, o.f_divergence_type, o.f_alpha_divergence_coef)
        return cls(logps, rho_pos, rho_neg, s_pos, s_neg, o.beta * (s_pos - s_neg))

    @property
    def s_pos_per_token(self) -> Tensor:  # s⁺/|y⁺|
        return self.s_pos / self.logps.chosen_lengths.to(self.s_pos.dtype).clamp(min=1)

    @property
    def s_neg_per_token(self) -> Tensor:  # s⁻/|y⁻|
        return self.s_neg / self.logps.rejected_lengths.to(self.s_neg.dtype).clamp(min=1)


def _smoothed_sigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the label-smoothed logistic loss (used by AOT)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sorted_gap(a: Tensor, b: Tensor) -> Tensor:
    """sort(a) − sort(b), both ascending; stable so tied values keep a deterministic order."""
    return torch.sort(a, stable=True).values - torch.sort(b, stable=True).values


# ---- the losses, one per row of losses.md: ℓ_i from the scores x and the settings o ---------------


def _sigmoid(x: Scores, o: LossSettings) -> Tensor:
    return -F.logsigmoid(x.z)


def _hinge(x: Scores, o: LossSettings) -> Tensor:
    return torch.relu(1 - x.z)


def _ipo(x: Scores, o: LossSettings) -> Tensor:
    return (x.s_pos_per_token - x.s_neg_per_token - 1 / (2 * o.beta)) ** 2


def _exo_pair(x: Scores, o: LossSettings) -> Tensor:
    # KL between the model's pair distribution σ(±βΔ) and the smoothed label (1−ε, ε).
    eps = o.label_smoothing
    return torch.sigmoid(x.z) * (F.logsigmoid(x.z) - math.log(1 - eps)) + torch.sigmoid(-x.z) * (
        F.logsigmoid(-x.z) - math.log(eps)
    )


def _nca_pair(x: Scores, o: LossSettings) -> Tensor:
    beta = o.beta
    return -F.logsigmoid(beta * x.s_pos) - 0.5 * F.logsigmoid(-beta * x.s_pos) - 0.5 * F.logsigmoid(-beta * x.s_neg)


def _robust(x: Scores, o: LossSettings) -> Tensor:
    eps = o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x.z) + eps * F.logsigmoid(-x.z)) / (1 - 2 * eps)


def _bco_pair(x: Scores, o: LossSettings) -> Tensor:
    return -F.logsigmoid(o.beta * x.s_pos) - F.logsigmoid(-o.beta * x.s_neg)


def _sppo_hard(x: Scores, o: LossSettings) -> Tensor:
    return (x.s_pos - 1 / (2 * o.beta)) ** 2 + (x.s_neg + 1 / (2 * o.beta)) ** 2


def _aot(x: Scores, o: LossSettings) -> Tensor:  # indexed by sorted rank k, not by pair
    p = x.logps
    delta = _sorted_gap(p.chosen - p.rejected, p.ref_chosen - p.ref_rejected)
    return _smoothed_sigmoid_loss(o.beta * delta, o.label_smoothing)


def _aot_unpaired(x: Scores, o: LossSettings) -> Tensor:  # indexed by sorted rank k, not by pair
    return _smoothed_sigmoid_loss(o.beta * _sorted_gap(x.rho_pos, x.rho_neg), o.label_smoothing)


def _apo_zero(x: Scores, o: LossSettings) -> Tensor:
    return (1 - torch.sigmoid(o.beta * x.rho_pos)) + torch.sigmoid(o.beta * x.rho_neg)


def _apo_down(x: Scores, o: LossSettings) -> Tensor:
    return torch.sigmoid(o.beta * x.rho_pos) + (1 - torch.sigmoid(x.z))


def _discopop(x: Scores, o: LossSettings) -> Tensor:
    # m·exp(−z) written as exp(log σ(z/τ) − z): same value, but no 0·inf = nan for very negative z.
    one_minus_m = torch.sigmoid(-x.z / o.discopop_tau)
    return one_minus_m * -F.logsigmoid(x.z) + torch.exp(F.logsigmoid(x.z / o.discopop_tau) - x.z)


def _sft(x: Scores, o: LossSettings) -> Tensor:
    return x.logps.sft_nll.expand_as(x.logps.chosen)


def _sigmoid_norm(x: Scores, o: LossSettings) -> Tensor:
    return -F.logsigmoid(o.beta * (x.s_pos_per_token - x.s_neg_per_token))


# ---- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossType:
    """One row of the registry: the loss's function and what configuration knows of it (`LossOptions`: its paper,
    the settings it reads, its rule, whether it is per pair, what it needs beyond the four sums)."""

    function: Callable[[Scores, LossSettings], Tensor]  # per-pair ℓ_i [N]
    options: LossOptions

    @property
    def paper(self) -> str:
        return self.options.paper

    @property
    def settings(self) -> tuple[str, ...]:
        return self.options.settings

    @property
    def needs(self) -> tuple[str, ...]:
        return self.options.needs


FUNCTIONS: dict[str, Callable[[Scores, LossSettings], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
LOSS_TYPES: dict[str, LossType] = {name: LossType(FUNCTIONS[name], options) for name, options in LOSS_OPTIONS.items()}


# ---- the objective --------------------------------------------------------------------------------


def pair_losses(loss_type: str, x: Scores, o: LossSettings) -> Tensor:
    """ℓ_i [N] of one loss type (for aot/aot_unpaired indexed by sorted rank k rather than by pair), after checking
    that the batch holds what the row needs."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {list(LOSS_TYPES)}.")
    row = LOSS_TYPES[loss_type]
    if "lengths" in row.needs and (x.logps.chosen_lengths is None or x.logps.rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths.")
    if "sft_nll" in row.needs and x.logps.sft_nll is None:
        raise ValueError(f"loss_type {loss_type!r} needs sft_nll (mean token NLL of the chosen completions).")
    return row.function(x, o)


def rewards(x: Scores, o: LossSettings) -> tuple[Tensor, Tensor]:
    """(βρ⁺, βρ⁻) on the raw log-ratios (never f-transformed), detached: for the rewards/* metrics."""
    return (o.beta * x.rho_pos).detach(), (o.beta * x.rho_neg).detach()


def dpo_objective(
    loss_types: list[str] | str,
    loss_weights: list[float] | None,
    logps: PairLogps,
    settings: LossSettings,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """(Σ_k w_k · mean_i(pair_weights_i · ℓ_i^(k)), each term's mean keyed by loss type, βρ⁺, βρ⁻)."""
    check_loss_options(
        {
            **vars(settings),
            "loss_type": loss_types,
            "loss_weights": loss_weights,
            "use_weighting": pair_weights is not None,
        }
    )  # the config's rules, also for direct callers
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    x = Scores.of(logps, settings)
    total, terms = 0.0, {}
    for loss_type, weight in zip(types, weights):
        losses = pair_losses(loss_type, x, settings)
        if pair_weights is not None:
            losses = losses * pair_weights
        terms[loss_type] = losses.mean()
        total = total + weight * terms[loss_type]
    return total, terms, *rewards(x, settings)
