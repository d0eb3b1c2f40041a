"""rankbench.stats on known answers: identical methods tie, a planted constant improvement wins with an interval
that excludes 0, planted orderings give the right average ranks, too few seeds give no interval."""

import numpy as np
import pandas as pd
import pytest

from rankbench import stats


def test_identical_methods_tie():
    a = {s: v for s, v in enumerate([0.9, 0.8, 0.85, 0.95, 0.7])}
    result = stats.paired_comparison(a, dict(a), higher_is_better=True)
    assert result.verdict == stats.TIE and result.difference == 0 and result.low == 0 == result.high


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_a_planted_constant_improvement_wins_with_an_interval_excluding_zero(higher_is_better):
    rng = np.random.default_rng(0)
    base = {s: float(v) for s, v in enumerate(rng.normal(1.0, 0.3, 5))}  # large seed-to-seed spread
    step = 0.01 if higher_is_better else -0.01  # A better by 0.01 on every seed
    better = {s: v + step for s, v in base.items()}
    win = stats.paired_comparison(better, base, higher_is_better)
    assert win.verdict == stats.WIN and win.low > 0 and win.difference == pytest.approx(0.01)
    loss = stats.paired_comparison(base, better, higher_is_better)
    assert loss.verdict == stats.LOSS and loss.high < 0


def test_noise_without_a_shift_is_a_tie_and_unpaired_spread_does_not_matter():
    rng = np.random.default_rng(1)
    a = {s: float(v) for s, v in enumerate(rng.normal(0, 1, 8))}
    noise = [0.03, -0.03, 0.05, -0.05, 0.01, -0.01, 0.08, -0.08]  # differences of mean 0
    b = {s: a[s] + noise[s] for s in a}
    assert stats.paired_comparison(a, b, True).verdict == stats.TIE


def test_fewer_than_three_seeds_give_no_interval():
    interval = stats.seed_interval([0.5, 0.7])
    assert not interval.enough and stats.TOO_FEW in interval.text()
    paired = stats.paired_comparison({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0, 2: 5.0}, True)
    assert paired.verdict == stats.TOO_FEW and paired.n == 2


def test_seed_interval_brackets_the_median():
    values = [0.91, 0.93, 0.92, 0.95, 0.90]
    interval = stats.seed_interval(values)
    assert interval.estimate == 0.92 and interval.low <= 0.92 <= interval.high
    assert min(values) <= interval.low and interval.high <= max(values)
    assert stats.seed_interval(values) == interval  # seeded: reproducible


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_rankings_of_planted_orderings(higher_is_better):
    rng = np.random.default_rng(2)
    level = {"best": 3.0, "middle": 2.0, "worst": 1.0}
    if not higher_is_better:
        level = {k: -v for k, v in level.items()}
    rows = [{m: v + rng.normal(0, 0.1) + 10 * i for m, v in level.items()} for i in range(10)]
    ranking = stats.rank_methods(pd.DataFrame(rows), higher_is_better)
    assert list(ranking.average_ranks.index) == ["best", "middle", "worst"]
    assert ranking.average_ranks.tolist() == [1.0, 2.0, 3.0]
    assert ranking.distinguishable and ranking.critical_difference > 0


def test_rankings_average_tied_ranks_and_skip_the_test_with_few_configurations():
    ranking = stats.rank_methods(pd.DataFrame([{"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 2.0, "b": 2.0, "c": 0.0}]), True)
    assert ranking.average_ranks.to_dict() == {"a": 1.5, "b": 1.5, "c": 3.0}
    assert ranking.friedman_p is None and not ranking.distinguishable


def test_too_few_configurations_or_methods_give_average_ranks_without_a_test():
    """autorank needs five rows: with four configurations (or two methods) there are average ranks, no test."""
    rows = pd.DataFrame([{"a": 1.0, "b": 2.0, "c": 3.0}] * 4)
    ranking = stats.rank_methods(rows, higher_is_better=False)
    assert ranking.average_ranks.to_dict() == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert ranking.friedman_p is None and ranking.critical_difference is None and ranking.result is None
    two = stats.rank_methods(pd.DataFrame([{"a": 1.0, "b": 2.0}] * 8), higher_is_better=True)
    assert two.friedman_p is None and list(two.average_ranks.index) == ["b", "a"]


@pytest.mark.parametrize("values", [[1.0, 2.0, 5.0], [0.3, 0.31, 0.29, 0.5], list(np.random.default_rng(3).normal(size=7))])
@pytest.mark.parametrize("statistic", [np.median, np.mean])
def test_the_bootstrap_interval_is_scipys(values, statistic):
    """The written-out percentile bootstrap gives exactly scipy.stats.bootstrap's interval (same generator)."""
    import warnings

    from scipy.stats import bootstrap

    data = np.asarray(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = bootstrap((data,), statistic, confidence_level=stats.CONFIDENCE, n_resamples=stats.N_BOOT,
                              method="percentile", random_state=np.random.default_rng(stats.BOOTSTRAP_SEED))
    low, high = stats._bootstrap(data, statistic, stats.CONFIDENCE)
    assert (low, high) == (reference.confidence_interval.low, reference.confidence_interval.high)
