"""What configuration knows of each loss type, as plain data: its source, the settings it reads, its value rule.

The math lives in `pipeline.objective.losses` (one function per row of this table, docs/losses.md); this table is
what `DPOConfig`, params.yaml's check and the losses share, so checking a setting never imports the objective.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import PipelineError

# the options the objective reads (`pipeline.objective.losses.LossSettings`): their defaults live in DPO_OPTIONS
SETTING_NAMES = ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau")
# f-DPO's transforms g(ρ, a) (arXiv 2309.16240), in the order of docs/losses.md's table
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossOptions:
    """One loss type as configuration sees it."""

    paper: str
    settings: tuple[str, ...]  # the SETTING_NAMES it reads
    rule: Callable[[Mapping[str, Any]], str | None] | None = None  # the problem and its fix, naming settings
    per_pair: bool = True  # False: indexed by sorted rank, so per-pair (WPO) weights cannot apply
    needs: tuple[str, ...] = ()  # per-pair inputs beyond the four log-prob sums: "lengths", "sft_nll"


def _exo_pair_rule(o: Mapping[str, Any]) -> str | None:
    eps = o["label_smoothing"]
    return None if 0 < eps < 1 else f"needs label_smoothing > 0 and < 1 (got {eps}); the EXO authors recommend 1e-3."


def _robust_rule(o: Mapping[str, Any]) -> str | None:
    eps = o["label_smoothing"]
    return (
        None
        if 0 <= eps < 0.5
        else (f"needs label_smoothing in [0, 0.5) (got {eps}); it is the label-flip rate, e.g. 0.1.")
    )


_G = ("f_divergence_type", "f_alpha_divergence_coef")  # read through s± = g(ρ±)

LOSS_OPTIONS: dict[str, LossOptions] = {
    "sigmoid": LossOptions("DPO, arXiv 2305.18290", ("beta", *_G)),
    "hinge": LossOptions("SLiC, arXiv 2305.10425 (as in RSO, arXiv 2309.06657)", ("beta", *_G)),
    "ipo": LossOptions("IPO, arXiv 2310.12036", ("beta", *_G), needs=("lengths",)),
    "exo_pair": LossOptions("EXO, arXiv 2402.00856", ("beta", "label_smoothing", *_G), rule=_exo_pair_rule),
    "nca_pair": LossOptions("NCA, arXiv 2402.05369", ("beta", *_G)),
    "robust": LossOptions("Robust DPO, arXiv 2403.00409", ("beta", "label_smoothing", *_G), rule=_robust_rule),
    "bco_pair": LossOptions("BCO, arXiv 2404.04656", ("beta", *_G)),
    "sppo_hard": LossOptions("SPPO, arXiv 2405.00675", ("beta", *_G)),
    "aot": LossOptions("AOT, arXiv 2406.05882", ("beta", "label_smoothing"), per_pair=False),
    "aot_unpaired": LossOptions("AOT, arXiv 2406.05882", ("beta", "label_smoothing"), per_pair=False),
    "apo_zero": LossOptions("APO, arXiv 2408.06266", ("beta",)),
    "apo_down": LossOptions("APO, arXiv 2408.06266", ("beta", *_G)),
    "discopop": LossOptions("DiscoPOP, arXiv 2406.08414", ("beta", "discopop_tau", *_G)),
    "sft": LossOptions("SFT term of MPO, arXiv 2411.10442", (), needs=("sft_nll",)),
    "sigmoid_norm": LossOptions("length-normalised DPO (Tülu 3, arXiv 2411.15124)", ("beta", *_G), needs=("lengths",)),
}

_SETTING_WORD = re.compile(r"\b(" + "|".join(SETTING_NAMES) + r")\b")


def check_loss_options(options: Mapping[str, Any], name: Callable[[str], str] = lambda key: key) -> None:
    """Refuse a bad combination of objective options (DPOConfig names) with a message that names the fix.

    `name(key)` is how a message names an option. A missing key skips the rules that read it (the
    caller supplies DPOConfig's defaults).
    """
    if "loss_type" in options:
        types = options["loss_type"]
        types = [types] if isinstance(types, str) else list(types)
        unknown = [t for t in types if t not in LOSS_OPTIONS]
        if unknown:
            raise PipelineError(f"unknown {name('loss_type')} {unknown}; choose from {list(LOSS_OPTIONS)}.")
        if not types:
            raise PipelineError(
                f"{name('loss_type')} is empty; give at least one, e.g. {name('loss_type')}=['sigmoid']."
            )
    else:
        types = []
    weights = options.get("loss_weights")
    if types and weights is not None:
        weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
        if len(weights) != len(types):
            raise PipelineError(
                f"{name('loss_weights')} has {len(weights)} entries but {name('loss_type')} has "
                f"{len(types)} ({types}); give one weight per loss type."
            )
    if "f_divergence_type" in options and options["f_divergence_type"] not in F_DIVERGENCE_TYPES:
        raise PipelineError(
            f"unknown {name('f_divergence_type')} {options['f_divergence_type']!r}; "
            f"choose from {list(F_DIVERGENCE_TYPES)}."
        )
    if all(key in options for key in SETTING_NAMES):
        for loss_type in types:
            rule = LOSS_OPTIONS[loss_type].rule
            problem = rule(options) if rule else None
            if problem:
                problem = _SETTING_WORD.sub(lambda match: name(match[0]), problem)
                raise PipelineError(f"{name('loss_type')} {loss_type!r} {problem}")
    if options.get("use_weighting"):
        for loss_type in types:
            if not LOSS_OPTIONS[loss_type].per_pair:
                raise PipelineError(
                    f"{name('use_weighting')}=True is not supported with {name('loss_type')} {loss_type!r}: its losses "
                    f"are indexed by sorted rank, so per-pair weights cannot apply; turn off {name('use_weighting')} "
                    "or pick another loss."
                )
