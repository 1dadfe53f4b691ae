"""pipeline.judge.statistics: win rate, per-prompt means, the bootstrap interval's coverage and determinism, and
the length-controlled win rate's behaviour on data whose wins are, or are not, explained by length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.judge.statistics import (
    LENGTH_PENALTY,
    _fit_length_logistic,
    bootstrap_interval,
    length_controlled_win_rate,
    prompt_means,
    summary,
    win_rate,
)


def bernoulli(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(n) < p).astype(np.float64)


# win_rate


def test_ties_count_half_in_the_win_rate():
    assert win_rate([1.0, 0.5, 0.0, 0.5]) == 0.5
    assert win_rate([1.0, 1.0, 0.5, 0.0]) == pytest.approx(0.625)
    assert win_rate([0.5]) == 0.5


def test_an_empty_win_rate_raises():
    with pytest.raises(ValueError):
        win_rate([])


def test_outcomes_outside_zero_one_are_refused():
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0])
    with pytest.raises(ValueError):
        win_rate([float("nan")])


# prompt_means


def test_prompt_means_average_each_prompt_in_first_seen_order():
    outcomes = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0]
    groups = ["b", "a", "b", "c", "a", "b"]
    assert prompt_means(outcomes, groups) == pytest.approx([0.5, 0.5, 1.0])
    assert prompt_means([1.0, 0.0, 1.0], np.array([7, 7, 3])) == pytest.approx([0.5, 1.0])


def test_prompt_means_refuse_a_group_list_of_another_length():
    with pytest.raises(ValueError):
        prompt_means([1.0, 0.0], [0])


# bootstrap_interval


def test_bootstrap_interval_contains_the_true_rate_at_about_the_nominal_frequency():
    rng = np.random.default_rng(12345)
    p, n, experiments = 0.7, 200, 400
    covered = 0
    for experiment in range(experiments):
        low, high = bootstrap_interval(bernoulli(n, p, rng), resamples=400, confidence=0.95, seed=experiment)
        covered += low <= p <= high
    assert 0.90 <= covered / experiments <= 0.99


def test_bootstrap_interval_is_the_same_for_the_same_seed():
    values = bernoulli(150, 0.6, np.random.default_rng(0))
    assert bootstrap_interval(values, 500, seed=3) == bootstrap_interval(values, 500, seed=3)


def test_bootstrap_interval_differs_between_seeds():
    values = bernoulli(150, 0.6, np.random.default_rng(0))
    intervals = {bootstrap_interval(values, 500, seed=seed) for seed in range(5)}
    assert len(intervals) > 1


def test_bootstrap_interval_narrows_as_n_grows():
    rng = np.random.default_rng(1)
    small_low, small_high = bootstrap_interval(bernoulli(100, 0.6, rng), 500)
    large_low, large_high = bootstrap_interval(bernoulli(4000, 0.6, rng), 500)
    assert large_high - large_low < 0.5 * (small_high - small_low)
    assert small_low < small_high


def test_bootstrap_interval_brackets_the_mean_and_follows_the_confidence():
    values = bernoulli(300, 0.4, np.random.default_rng(2))
    low90, high90 = bootstrap_interval(values, 2000, confidence=0.90)
    low99, high99 = bootstrap_interval(values, 2000, confidence=0.99)
    assert low99 <= low90 < values.mean() < high90 <= high99
    # Widths as the normal approximation gives them: 2 z σ/√n, z = 1.645 (90%) and 2.576 (99%).
    standard_error = values.std() / math.sqrt(values.size)
    assert high90 - low90 == pytest.approx(2 * 1.645 * standard_error, rel=0.12)
    assert high99 - low99 == pytest.approx(2 * 2.576 * standard_error, rel=0.12)


def test_bootstrap_interval_of_equal_values_is_a_point():
    assert bootstrap_interval([0.25], 100) == (0.25, 0.25)
    assert bootstrap_interval([1.0] * 50, 100) == (1.0, 1.0)


def test_bootstrap_interval_in_blocks_matches_the_whole_matrix(monkeypatch):
    import pipeline.judge.statistics as statistics

    # The index matrix drawn block by block is the same stream of draws as drawn whole: the same interval.
    values = bernoulli(101, 0.5, np.random.default_rng(4))
    whole = bootstrap_interval(values, 300, seed=9)
    monkeypatch.setattr(statistics, "BOOTSTRAP_BLOCK_ELEMENTS", 101 * 7)  # 7 resamples a block, the last one short
    assert bootstrap_interval(values, 300, seed=9) == whole


def test_bootstrap_interval_refuses_bad_arguments():
    with pytest.raises(ValueError):
        bootstrap_interval([], 100)
    with pytest.raises(ValueError):
        bootstrap_interval([0.0, 1.0], 0)
    with pytest.raises(ValueError):
        bootstrap_interval([0.0, 1.0], 100, confidence=1.0)


# length_controlled_win_rate


def test_length_controlled_equals_raw_when_lengths_are_equal():
    rng = np.random.default_rng(5)
    outcomes = rng.choice([0.0, 0.5, 1.0], size=301, p=[0.3, 0.1, 0.6])
    raw = win_rate(outcomes)
    for difference in (0.0, 12.0, -3.5, 0.1):
        controlled = length_controlled_win_rate(outcomes, np.full(outcomes.size, difference))
        assert abs(controlled - raw) < 1e-9


def test_length_controlled_moves_toward_half_when_wins_are_explained_by_length():
    # The policy wins exactly when its answer is longer, and it is longer on 80% of prompts.
    rng = np.random.default_rng(6)
    differences = rng.normal(0.8416, 1.0, 2000) * 40.0
    outcomes = (differences > 0).astype(np.float64)
    raw = win_rate(outcomes)
    controlled = length_controlled_win_rate(outcomes, differences)
    assert raw == pytest.approx(0.8, abs=0.02)
    assert abs(controlled - 0.5) < 0.15
    assert abs(controlled - 0.5) < abs(raw - 0.5) - 0.1


def test_length_controlled_stays_near_raw_when_wins_are_independent_of_length():
    rng = np.random.default_rng(7)
    outcomes = np.zeros(2000)
    outcomes[:1500] = 1.0
    rng.shuffle(outcomes)
    differences = rng.normal(20.0, 50.0, outcomes.size)
    assert win_rate(outcomes) == 0.75
    assert abs(length_controlled_win_rate(outcomes, differences) - 0.75) < 0.05


def test_length_controlled_is_half_when_length_effects_are_symmetric():
    # Wins at +k tokens, losses at -k: the fit is odd in d, so it predicts exactly a coin flip at d = 0.
    lengths = np.arange(1.0, 51.0)
    differences = np.concatenate([lengths, -lengths])
    outcomes = np.concatenate([np.ones(50), np.zeros(50)])
    assert length_controlled_win_rate(outcomes, differences) == pytest.approx(0.5, abs=1e-6)


def test_length_controlled_counts_ties_as_half_targets():
    assert length_controlled_win_rate([0.5] * 9, np.arange(9.0)) == 0.5
    # Ties spread over lengths pull the fit like half a win: the result stays strictly between the extremes.
    outcomes = np.array([1.0, 0.5, 0.5, 0.0, 1.0, 0.5])
    controlled = length_controlled_win_rate(outcomes, [5.0, -2.0, 1.0, -7.0, 3.0, 0.0])
    assert 0.0 < controlled < 1.0


@pytest.mark.parametrize(
    "outcomes",
    [np.ones(40), np.zeros(40), np.r_[np.ones(39), 0.0], np.r_[0.0, np.ones(39)], np.r_[np.zeros(39), 1.0]],
    ids=["all_wins", "all_losses", "one_loss_at_longest", "one_loss_at_shortest", "one_win_at_longest"],
)
def test_length_controlled_is_finite_in_zero_one_for_degenerate_outcomes(outcomes):
    differences = np.linspace(-30.0, 50.0, outcomes.size)
    controlled = length_controlled_win_rate(outcomes, differences)
    assert math.isfinite(controlled) and 0.0 <= controlled <= 1.0
    if np.all(outcomes == outcomes[0]):
        assert controlled == outcomes[0]


def test_length_fit_reaches_the_penalized_optimum_on_separable_data():
    rng = np.random.default_rng(8)
    x = rng.normal(0.5, 1.0, 500)
    targets = (x > 0).astype(np.float64)
    a, b = _fit_length_logistic(targets, x, LENGTH_PENALTY)
    p = 0.5 * (1.0 + np.tanh(0.5 * (a + b * x)))
    gradient = np.array([np.mean(p - targets), np.mean((p - targets) * x) + LENGTH_PENALTY * b])
    assert math.isfinite(a) and math.isfinite(b) and b > 0
    assert np.max(np.abs(gradient)) < 1e-8


def test_length_controlled_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.0, 0.0], [1.0])
    with pytest.raises(ValueError):
        length_controlled_win_rate([], [])


# summary


def test_summary_reports_counts_interval_and_length_control():
    outcomes = [1.0, 1.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.5]
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    differences = [10.0, 3.0, 0.0, -4.0, 8.0, -1.0, 2.0, 0.0]
    result = summary(outcomes, groups, differences, resamples=500, confidence=0.9, seed=1)
    assert set(result) == {
        "win_rate",
        "win_rate_low",
        "win_rate_high",
        "length_controlled_win_rate",
        "wins",
        "ties",
        "losses",
        "num_comparisons",
    }
    assert (result["wins"], result["ties"], result["losses"], result["num_comparisons"]) == (4, 2, 2, 8)
    assert all(type(result[key]) is int for key in ("wins", "ties", "losses", "num_comparisons"))
    assert result["win_rate"] == 0.625
    assert (result["win_rate_low"], result["win_rate_high"]) == bootstrap_interval(
        prompt_means(outcomes, groups), 500, 0.9, 1
    )
    assert result["length_controlled_win_rate"] == length_controlled_win_rate(outcomes, differences)


def test_summary_bootstraps_prompts_not_samples():
    # Every prompt has one win and one loss: per-prompt means are all 0.5, so the interval over prompts is a point,
    # where resampling the individual comparisons would give a wide one.
    outcomes = [1.0, 0.0] * 50
    groups = np.repeat(np.arange(50), 2)
    result = summary(outcomes, groups, np.zeros(100), resamples=300)
    assert (result["win_rate_low"], result["win_rate_high"]) == (0.5, 0.5)
    ungrouped = summary(outcomes, None, np.zeros(100), resamples=300)
    assert ungrouped["win_rate_high"] - ungrouped["win_rate_low"] > 0.1
