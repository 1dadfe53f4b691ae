"""A judge's verdicts as evaluate reports them: the figures of results/eval.json and the examples of the run report.

Figures (flat names; `None`-free so DVC can compare them): `win_rate` (ties count half), `win_rate_low` and
`win_rate_high` (the bootstrap interval over prompts at evaluate.confidence), `length_controlled_win_rate`,
`wins`, `ties`, `losses`, `num_comparisons`, `unparsed_verdicts` (pairwise: comparisons left out of the win rate
because a reply was no verdict), `policy_mean_length` and `reference_mean_length` (tokens of the policy's
tokenizer), and for a judge that scores answers `policy_mean_score`, `reference_mean_score` and `score_margin`
(the mean of policy minus reference score over the comparisons).
"""

from __future__ import annotations

from statistics import fmean

from pipeline.judge import statistics
from pipeline.judge.judges import Comparison, judged
from pipeline.judge.sampling import answer_length, prompt_text

FIGURES = (
    "win_rate",
    "win_rate_low",
    "win_rate_high",
    "length_controlled_win_rate",
    "wins",
    "ties",
    "losses",
    "num_comparisons",
    "unparsed_verdicts",
    "policy_mean_length",
    "reference_mean_length",
    "policy_mean_score",
    "reference_mean_score",
    "score_margin",
)


def lengths_of(comparisons: list[Comparison], processing_class) -> list[tuple[int, int]]:
    """(policy, reference) answer lengths of each comparison, in `processing_class`'s tokens."""
    return [
        (answer_length(processing_class, c.policy), answer_length(processing_class, c.reference)) for c in comparisons
    ]


def examples_of(comparisons: list[Comparison], verdicts: list[dict] | None, lengths: list[tuple[int, int]]) -> list:
    """One example per comparison: prompt text, both answers, their lengths, the sample index, and the verdict
    (`outcome`, scores or replies) with its `disagreement` (the score gap, or 1 for a decisive pairwise verdict)."""
    out, seen = [], {}
    for i, (c, (mine, theirs)) in enumerate(zip(comparisons, lengths)):
        sample = seen[c.group] = seen.get(c.group, -1) + 1
        example = {
            "prompt": prompt_text(c.prompt["prompt"]),
            "policy": c.policy,
            "reference": c.reference,
            "prompt_index": c.group,
            "sample": sample,
            "policy_length": mine,
            "reference_length": theirs,
        }
        if c.prompt.get("images"):
            example["images"] = c.prompt["images"]
        if verdicts is not None:
            verdict = verdicts[i]
            example.update(verdict)
            if "policy_score" in verdict:
                example["disagreement"] = abs(verdict["policy_score"] - verdict["reference_score"])
            else:
                example["disagreement"] = 0.0 if verdict["outcome"] in (0.5, None) else 1.0
        out.append(example)
    return out


def figures(examples: list[dict], resamples: int, confidence: float, seed: int) -> dict:
    """The judged figures of `examples` (see the module docstring); only the lengths without a verdict."""
    metrics = {
        "policy_mean_length": fmean(e["policy_length"] for e in examples),
        "reference_mean_length": fmean(e["reference_length"] for e in examples),
    }
    if not examples or "outcome" not in examples[0]:
        return metrics
    parsed = [e for e in examples if e["outcome"] is not None]
    metrics["unparsed_verdicts"] = len(examples) - len(parsed)
    if parsed:
        metrics.update(
            statistics.summary(
                [e["outcome"] for e in parsed],
                [e["prompt_index"] for e in parsed],
                [e["policy_length"] - e["reference_length"] for e in parsed],
                resamples,
                confidence,
                seed,
            )
        )
    if "policy_score" in examples[0]:
        metrics["policy_mean_score"] = fmean(e["policy_score"] for e in examples)
        metrics["reference_mean_score"] = fmean(e["reference_score"] for e in examples)
        metrics["score_margin"] = fmean(e["policy_score"] - e["reference_score"] for e in examples)
    return metrics


def compare_answers(
    judge,
    prompts: list,
    policy_answers: list[str],
    reference_answers: list[str],
    processing_class,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The in-process form of evaluate's judging: `judge` (a `BuiltinJudge`, `RewardModelJudge` or `PairwiseJudge`)
    compares each policy answer with the reference answer to the same prompt (prompts as chat messages or text, one
    comparison per prompt); returns the figures (module docstring) and `examples`. Lengths are counted in
    `processing_class`'s tokens."""
    comparisons = [
        Comparison({"prompt": p, "images": None}, a, b, i)
        for i, (p, a, b) in enumerate(zip(prompts, policy_answers, reference_answers, strict=True))
    ]
    examples = examples_of(comparisons, judged(judge, comparisons), lengths_of(comparisons, processing_class))
    return {**figures(examples, resamples, confidence, seed), "examples": examples}
