"""DPO objectives: a registry of the losses.md table, one small pure function per loss type.

Inputs are per-pair summed log-probabilities (policy and reference, `PairLogps`); `preference_loss`
computes the notation of losses.md once (`Scores`: ρ±, s± = g(ρ±), z = βΔ) and hands it to the loss
type's function, which returns the per-pair losses ℓ_i. Every log σ goes through `F.logsigmoid`.
The objective's validation rules live here too, once: `check_loss_options`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import PipelineError


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


_SETTING_NAMES = tuple(f.name for f in fields(LossSettings))


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
    return (torch.sigmoid(x.z) * (F.logsigmoid(x.z) - math.log(1 - eps))
            + torch.sigmoid(-x.z) * (F.logsigmoid(-x.z) - math.log(eps)))


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
    """One row of the registry: the loss's function and its own settings and rules."""

    function: Callable[[Scores, LossSettings], Tensor]  # per-pair ℓ_i [N]
    paper: str
    settings: tuple[str, ...]  # the LossSettings fields it reads
    rule: Callable[[LossSettings], str | None] | None = None  # the problem and its fix, naming settings by field
    per_pair: bool = True  # False: indexed by sorted rank, so per-pair (WPO) weights cannot apply
    needs: tuple[str, ...] = ()  # PairLogps fields beyond the four sums: "lengths", "sft_nll"


def _exo_pair_rule(o: LossSettings) -> str | None:
    eps = o.label_smoothing
    return None if 0 < eps < 1 else f"needs label_smoothing > 0 and < 1 (got {eps}); the EXO authors recommend 1e-3."


def _robust_rule(o: LossSettings) -> str | None:
    eps = o.label_smoothing
    return None if 0 <= eps < 0.5 else (
        f"needs label_smoothing in [0, 0.5) (got {eps}); it is the label-flip rate, e.g. 0.1.")


_G = ("f_divergence_type", "f_alpha_divergence_coef")  # read through s± = g(ρ±)

LOSS_TYPES: dict[str, LossType] = {
    "sigmoid": LossType(_sigmoid, "DPO, arXiv 2305.18290", ("beta", *_G)),
    "hinge": LossType(_hinge, "SLiC, arXiv 2305.10425 (as in RSO, arXiv 2309.06657)", ("beta", *_G)),
    "ipo": LossType(_ipo, "IPO, arXiv 2310.12036", ("beta", *_G), needs=("lengths",)),
    "exo_pair": LossType(_exo_pair, "EXO, arXiv 2402.00856", ("beta", "label_smoothing", *_G), rule=_exo_pair_rule),
    "nca_pair": LossType(_nca_pair, "NCA, arXiv 2402.05369", ("beta", *_G)),
    "robust": LossType(_robust, "Robust DPO, arXiv 2403.00409", ("beta", "label_smoothing", *_G), rule=_robust_rule),
    "bco_pair": LossType(_bco_pair, "BCO, arXiv 2404.04656", ("beta", *_G)),
    "sppo_hard": LossType(_sppo_hard, "SPPO, arXiv 2405.00675", ("beta", *_G)),
    "aot": LossType(_aot, "AOT, arXiv 2406.05882", ("beta", "label_smoothing"), per_pair=False),
    "aot_unpaired": LossType(_aot_unpaired, "AOT, arXiv 2406.05882", ("beta", "label_smoothing"), per_pair=False),
    "apo_zero": LossType(_apo_zero, "APO, arXiv 2408.06266", ("beta",)),
    "apo_down": LossType(_apo_down, "APO, arXiv 2408.06266", ("beta", *_G)),
    "discopop": LossType(_discopop, "DiscoPOP, arXiv 2406.08414", ("beta", "discopop_tau", *_G)),
    "sft": LossType(_sft, "SFT term of MPO, arXiv 2411.10442", (), needs=("sft_nll",)),
    "sigmoid_norm": LossType(_sigmoid_norm, "length-normalised DPO (Tülu 3, arXiv 2411.15124)", ("beta", *_G),
                             needs=("lengths",)),
}


# ---- the objective --------------------------------------------------------------------------------

def _pair_losses(loss_type: str, x: Scores, o: LossSettings) -> Tensor:
    """ℓ_i of one loss type, after checking that the batch holds what the row needs."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {list(LOSS_TYPES)}.")
    row = LOSS_TYPES[loss_type]
    if "lengths" in row.needs and (x.logps.chosen_lengths is None or x.logps.rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths.")
    if "sft_nll" in row.needs and x.logps.sft_nll is None:
        raise ValueError(f"loss_type {loss_type!r} needs sft_nll (mean token NLL of the chosen completions).")
    return row.function(x, o)


def _rewards(x: Scores, o: LossSettings) -> tuple[Tensor, Tensor]:
    """(βρ⁺, βρ⁻) on the raw log-ratios (never f-transformed), detached: for the rewards/* metrics."""
    return (o.beta * x.rho_pos).detach(), (o.beta * x.rho_neg).detach()


def preference_loss(loss_type: str, logps: PairLogps, settings: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses ℓ_i, chosen rewards βρ⁺, rejected rewards βρ⁻), each [N].

    For aot/aot_unpaired the losses are indexed by sorted rank k rather than by pair.
    """
    x = Scores.of(logps, settings)
    return _pair_losses(loss_type, x, settings), *_rewards(x, settings)


def dpo_objective(
    loss_types: list[str] | str,
    loss_weights: list[float] | None,
    logps: PairLogps,
    settings: LossSettings,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """(Σ_k w_k · mean_i(pair_weights_i · ℓ_i^(k)), each term's mean keyed by loss type, βρ⁺, βρ⁻)."""
    check_loss_options({**vars(settings), "loss_type": loss_types, "loss_weights": loss_weights,
                        "use_weighting": pair_weights is not None})  # the config's rules, also for direct callers
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    x = Scores.of(logps, settings)
    total, terms = 0.0, {}
    for loss_type, weight in zip(types, weights):
        losses = _pair_losses(loss_type, x, settings)
        if pair_weights is not None:
            losses = losses * pair_weights
        terms[loss_type] = losses.mean()
        total = total + weight * terms[loss_type]
    return total, terms, *_rewards(x, settings)


# ---- validation: the one home of the objective's rules --------------------------------------------

_SETTING_WORD = re.compile(r"\b(" + "|".join(_SETTING_NAMES) + r")\b")


def check_loss_options(options: Mapping[str, Any], name: Callable[[str], str] = lambda key: key) -> None:
    """Refuse a bad combination of objective options (DPOConfig names) with a message that names the fix.

    `name(key)` is how a message names an option. A missing key skips the rules that read it (the
    caller supplies DPOConfig's defaults).
    """
    if "loss_type" in options:
        types = options["loss_type"]
        types = [types] if isinstance(types, str) else list(types)
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            raise PipelineError(f"unknown {name('loss_type')} {unknown}; choose from {list(LOSS_TYPES)}.")
        if not types:
            raise PipelineError(f"{name('loss_type')} is empty; give at least one, "
                                f"e.g. {name('loss_type')}=['sigmoid'].")
    else:
        types = []
    weights = options.get("loss_weights")
    if types and weights is not None:
        weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
        if len(weights) != len(types):
            raise PipelineError(f"{name('loss_weights')} has {len(weights)} entries but {name('loss_type')} has "
                                f"{len(types)} ({types}); give one weight per loss type.")
    if "f_divergence_type" in options and options["f_divergence_type"] not in F_DIVERGENCES:
        raise PipelineError(f"unknown {name('f_divergence_type')} {options['f_divergence_type']!r}; "
                            f"choose from {list(F_DIVERGENCES)}.")
    if all(key in options for key in _SETTING_NAMES):
        settings = LossSettings.of(options)
        for loss_type in types:
            rule = LOSS_TYPES[loss_type].rule
            problem = rule(settings) if rule else None
            if problem:
                problem = _SETTING_WORD.sub(lambda match: name(match[0]), problem)
                raise PipelineError(f"{name('loss_type')} {loss_type!r} {problem}")
    if options.get("use_weighting"):
        for loss_type in types:
            if not LOSS_TYPES[loss_type].per_pair:
                raise PipelineError(
                    f"{name('use_weighting')}=True is not supported with {name('loss_type')} {loss_type!r}: its losses "
                    f"are indexed by sorted rank, so per-pair weights cannot apply; turn off {name('use_weighting')} "
                    "or pick another loss.")
