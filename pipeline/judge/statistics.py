"""The statistics of a judge's verdicts: win rate, its bootstrap interval over prompts, a length-controlled win rate.

An outcome is one comparison of a policy answer with the reference answer to the same prompt: 1.0 when the policy
wins, 0.5 for a tie, 0.0 when the reference wins (values in between are accepted as soft verdicts). All functions
are pure and use numpy only; inputs may be sequences, numpy arrays or CPU tensors.

- `win_rate`: the mean outcome (ties count half).
- `prompt_means` + `bootstrap_interval`: with several samples per prompt, the prompt is the unit that was drawn, so
  outcomes are averaged per prompt and the percentile bootstrap resamples prompts, not samples.
- `length_controlled_win_rate`: AlpacaEval 2's length control reduced to one covariate, the policy's answer length
  minus the reference's: a logistic regression of the outcome on it, read at zero length difference.
- `summary`: all of it for one set of verdicts, as a flat dict.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

# Elements of one block of the bootstrap's resamples x n index matrix (int64: 32 MiB).
BOOTSTRAP_BLOCK_ELEMENTS = 1 << 22
# The L2 penalty on the length coefficient, on the mean cross-entropy (so its weight does not depend on n).
LENGTH_PENALTY = 1e-3
NEWTON_MAX_ITERATIONS = 100
NEWTON_GRADIENT_TOLERANCE = 1e-10


def _outcomes(outcomes: Any) -> np.ndarray:
    """Outcomes as a 1-D float64 array, checked: non-empty, finite, in [0, 1]."""
    values = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no outcomes: a win rate needs at least one comparison")
    if not np.all(np.isfinite(values)) or np.any(values < 0.0) or np.any(values > 1.0):
        raise ValueError("outcomes must lie in [0, 1] (1.0 policy wins, 0.5 tie, 0.0 reference wins)")
    return values


def win_rate(outcomes: Sequence[float] | np.ndarray) -> float:
    """The policy's win rate: the mean of `outcomes` ([N], 1.0 win, 0.5 tie, 0.0 loss), so a tie counts half.

    Raises ValueError when `outcomes` is empty."""
    return float(_outcomes(outcomes).mean())


def prompt_means(outcomes: Sequence[float] | np.ndarray, groups: Sequence[Hashable] | np.ndarray) -> list[float]:
    """The mean outcome of each prompt: `outcomes` [N] and `groups` [N] (the prompt of each comparison, any hashable
    id) give one value per distinct prompt, in the order prompts are first seen. These are the units that
    `bootstrap_interval` resamples."""
    values = _outcomes(outcomes)
    keys = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    if len(keys) != values.size:
        raise ValueError(f"{values.size} outcomes but {len(keys)} group ids: one prompt id per outcome")
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for key, value in zip(keys, values.tolist()):
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1
    return [sums[key] / counts[key] for key in sums]


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, resamples: int, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` ([P], one value per prompt): `resamples` means of P
    values drawn with replacement (numpy `default_rng(seed)`, a resamples x P index matrix built in blocks), and
    their (1 - confidence)/2 and (1 + confidence)/2 quantiles. Returns (low, high); (v, v) when every value is v."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if data.size == 0:
        raise ValueError("no values to bootstrap")
    if not np.all(np.isfinite(data)):
        raise ValueError("bootstrap values must be finite")
    if int(resamples) < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if np.all(data == data[0]):
        v = float(data[0])
        return v, v
    resamples, n = int(resamples), data.size
    rng = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_BLOCK_ELEMENTS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = data[index].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def _fit_length_logistic(targets: np.ndarray, x: np.ndarray, penalty: float) -> tuple[float, float]:
    """(a, b) minimizing mean_i[softplus(a + b x_i) - y_i (a + b x_i)] + penalty/2 b², the cross-entropy of soft
    targets y_i in [0, 1]: damped Newton (backtracking on the objective), at most NEWTON_MAX_ITERATIONS steps,
    stopping when the gradient is below NEWTON_GRADIENT_TOLERANCE. The intercept is not penalized, so it may grow
    large (slowly, about one unit a step) when the targets are nearly all 1 or all 0."""
    n = targets.size
    design = np.stack([np.ones(n), x], axis=1)  # [N, 2]
    ridge = np.array([0.0, penalty])

    def objective(theta: np.ndarray) -> float:
        z = design @ theta
        return float(np.mean(np.logaddexp(0.0, z) - targets * z) + 0.5 * penalty * theta[1] ** 2)

    mean = float(np.clip(targets.mean(), 1e-6, 1.0 - 1e-6))
    theta = np.array([math.log(mean / (1.0 - mean)), 0.0])
    value = objective(theta)
    for _ in range(NEWTON_MAX_ITERATIONS):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (p - targets) / n + ridge * theta
        if float(np.max(np.abs(gradient))) < NEWTON_GRADIENT_TOLERANCE:
            break
        weights = p * (1.0 - p)
        hessian = (design * weights[:, None]).T @ design / n + np.diag(ridge) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        # Newton steps on a nearly flat direction (a saturated intercept) can be huge: cap their length.
        norm = float(np.linalg.norm(step))
        if norm > 10.0:
            step *= 10.0 / norm
        scale, accepted = 1.0, False
        slope = float(gradient @ step)
        for _ in range(40):
            candidate = theta - scale * step
            candidate_value = objective(candidate)
            if candidate_value <= value - 1e-4 * scale * slope:
                accepted = True
                break
            scale *= 0.5
        if not accepted:
            break  # no decrease left at float64 precision: this is the minimum
        theta, value = candidate, candidate_value
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(
    outcomes: Sequence[float] | np.ndarray, length_differences: Sequence[float] | np.ndarray
) -> float:
    """The win rate at zero length difference: outcomes [N] (1.0 / 0.5 / 0.0) and length_differences [N] (the policy
    answer's length minus the reference answer's, in tokens or words).

    Fits P(policy wins) = sigmoid(a + b d / std(d)) by maximum likelihood with ties as targets of 0.5 (soft-label
    cross-entropy) and a small L2 penalty on b only, and returns sigmoid(a), clipped into [0, 1]. A policy that wins
    because its answers are longer gets a rate nearer 0.5 than its raw win rate; one whose wins do not depend on
    length keeps about its raw rate. When every length difference is the same (std 0), or every outcome is (the fit
    would be b = 0, a = logit of it), the raw win rate is returned exactly."""
    targets = _outcomes(outcomes)
    d = np.asarray(length_differences, dtype=np.float64).reshape(-1)
    if d.size != targets.size:
        raise ValueError(f"{targets.size} outcomes but {d.size} length differences: one per comparison")
    if not np.all(np.isfinite(d)):
        raise ValueError("length differences must be finite")
    raw = float(targets.mean())
    if np.all(d == d[0]) or np.all(targets == targets[0]):
        return raw
    std = float(d.std())
    if not std > 0.0:
        return raw
    a, _ = _fit_length_logistic(targets, d / std, LENGTH_PENALTY)
    return float(np.clip(_sigmoid(a), 0.0, 1.0))


def summary(
    outcomes: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray | None,
    length_differences: Sequence[float] | np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """The statistics of one set of verdicts: outcomes [N], groups [N] (prompt id per comparison; None: each
    comparison is its own prompt), length_differences [N] (policy minus reference length).

    Keys: `win_rate`; `win_rate_low`, `win_rate_high` (the bootstrap interval of the mean of per-prompt means);
    `length_controlled_win_rate` (fit on the individual comparisons); `wins`, `ties`, `losses` (outcomes above,
    equal to, below 0.5) and `num_comparisons`, as ints."""
    values = _outcomes(outcomes)
    per_prompt = values if groups is None else np.asarray(prompt_means(values, groups))
    low, high = bootstrap_interval(per_prompt, resamples, confidence, seed)
    return {
        "win_rate": win_rate(values),
        "win_rate_low": low,
        "win_rate_high": high,
        "length_controlled_win_rate": length_controlled_win_rate(values, length_differences),
        "wins": int(np.count_nonzero(values > 0.5)),
        "ties": int(np.count_nonzero(values == 0.5)),
        "losses": int(np.count_nonzero(values < 0.5)),
        "num_comparisons": int(values.size),
    }
