"""New preference pairs from scored answers (`dpo judge-pairs`): pure functions of the answers and their scores.

Per prompt, identical answers count once. `best_worst` pairs the best-scored answer (chosen) with the worst
(rejected); `margin` pairs every two answers whose scores differ by more than `min_margin`. A prompt yields no pair
for one of DROP_REASONS, and the report counts them so that prompts in = prompts with a pair + prompts dropped.
"""

from __future__ import annotations

from collections import Counter
from statistics import fmean

import numpy as np

DROP_REASONS = {
    "identical_answers": "every answer was the same text",
    "all_tie": "the judge scored every answer equally",
    "below_margin": "no two answers' scores differ by more than min_margin",
}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
MAX_LISTED_SCORES = 20  # a distribution with at most this many distinct scores is also given as counts


def prompt_pairs(
    answers: list[str], scores: list[float], pairing: str, min_margin: float
) -> tuple[list[tuple[int, int]], str | None]:
    """The pairs (chosen index, rejected index) among one prompt's answers, or [] and the key of DROP_REASONS."""
    first = {}
    for i, answer in enumerate(answers):
        first.setdefault(answer, i)
    distinct = sorted(first.values())
    if len(distinct) < 2:
        return [], "identical_answers"
    if len({scores[i] for i in distinct}) == 1:
        return [], "all_tie"
    if pairing == "best_worst":
        best = max(distinct, key=lambda i: (scores[i], -i))
        worst = min(distinct, key=lambda i: (scores[i], i))
        candidates = [(best, worst)]
    else:
        candidates = [(i, j) for i in distinct for j in distinct if i != j]
    pairs = [(i, j) for i, j in candidates if scores[i] - scores[j] > min_margin]
    return pairs, (None if pairs else "below_margin")


def score_distribution(scores: list[float]) -> dict:
    """count, mean, min, quantiles and max of `scores`; with few distinct values, also how many answers got each."""
    if not scores:
        return {"count": 0}
    values = np.asarray(scores, dtype=float)
    out = {
        "count": len(scores),
        "mean": fmean(scores),
        "min": float(values.min()),
        **{f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES},
        "max": float(values.max()),
    }
    counts = Counter(float(s) for s in scores)
    if len(counts) <= MAX_LISTED_SCORES:
        out["counts"] = {str(k): counts[k] for k in sorted(counts)}
    return out


def pairs_report(dropped: list[str | None], num_pairs: int, scores: list[float]) -> dict:
    """The report of one pairing: `dropped` holds each prompt's drop reason (None: it gave pairs)."""
    by_reason = Counter(r for r in dropped if r is not None)
    return {
        "prompts_in": len(dropped),
        "prompts_with_pairs": sum(r is None for r in dropped),
        "prompts_dropped": sum(by_reason.values()),
        "dropped_by_reason": {reason: by_reason[reason] for reason in DROP_REASONS if by_reason[reason]},
        "pairs_out": num_pairs,
        "scores": score_distribution(scores),
    }
