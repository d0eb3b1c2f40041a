"""How sure a verdict is: intervals over seeds, paired comparisons of two methods, and rankings across
configurations. Every report, comparison and claim check uses these functions, so "A beats B" means one thing.

* ``seed_interval``: the median over seeds with a percentile-bootstrap interval of the median (the
  computation of scipy's ``stats.bootstrap``, written out in NumPy). With fewer than ``MIN_SEEDS`` values there is no interval: the text says "n too small".
* ``paired_comparison``: two methods on the same task configuration and budget, paired by seed. The difference is
  oriented so that positive means "A is better" (whatever the metric's direction); its mean over the common seeds
  gets a percentile-bootstrap interval, and the call is ``win`` (interval above 0), ``loss`` (below 0) or ``tie``
  (the interval contains 0). Pairing removes what the seed changes for both methods alike (the data, the initial
  network), which is most of the spread here. Fewer than ``MIN_SEEDS`` common seeds: ``n too small``.
* ``rank_methods``: methods ranked on every configuration (a row; all methods must be present), average ranks, the
  Friedman test and Nemenyi's critical difference, through ``autorank`` (forced non-parametric: rank-based tests
  make no assumption about how a metric is distributed across very different task configurations, and the
  Friedman/Nemenyi pair with its critical-difference diagram is the standard of Demšar, JMLR 2006).

Bootstraps are seeded (``BOOTSTRAP_SEED``), so a report is reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

MIN_SEEDS = 3  # fewer values than this: no interval, no win/loss call
MIN_METHODS, MIN_CONFIGURATIONS = 3, 5  # fewer: no Friedman test (autorank needs at least five rows)
CONFIDENCE = 0.95
N_BOOT = 9999
BOOTSTRAP_SEED = 0
WIN, TIE, LOSS, TOO_FEW = "win", "tie", "loss", "n too small"


def _bootstrap(values: np.ndarray, statistic, confidence: float) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over ``values`` (constant values: the value itself).

    The same computation as ``scipy.stats.bootstrap(..., method="percentile")`` with the same generator: N_BOOT
    resamples of n indices drawn at once, the statistic along the last axis, NumPy's linear percentiles at
    (1 - confidence)/2 and its complement -- identical intervals (``tests/test_stats.py`` checks it against scipy).
    Written out because importing ``scipy.stats`` costs a report half a second and its input checks more than the
    resampling itself; ``statistic`` must accept ``axis``.
    """
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resamples = values[rng.integers(0, values.size, (N_BOOT, values.size))]
    estimates = statistic(resamples, axis=-1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(estimates, tail)), float(np.percentile(estimates, 100 - tail))


@dataclasses.dataclass(frozen=True)
class Interval:
    """The median of ``n`` values over seeds, and its bootstrap interval (None when ``n < MIN_SEEDS``)."""

    estimate: float
    low: float | None
    high: float | None
    n: int

    @property
    def enough(self) -> bool:
        return self.low is not None

    def text(self, digits: int = 4) -> str:
        if not math.isfinite(self.estimate):
            return "–"
        value = f"{self.estimate:.{digits}g}"
        if not self.enough:
            return f"{value} (n={self.n}: {TOO_FEW})"
        return f"{value} [{self.low:.{digits}g}, {self.high:.{digits}g}] (n={self.n})"


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Median over seeds with its percentile-bootstrap interval (non-finite values are dropped)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if data.size == 0:
        return Interval(math.nan, None, None, 0)
    median = float(np.median(data))
    if data.size < MIN_SEEDS:
        return Interval(median, None, None, int(data.size))
    low, high = _bootstrap(data, np.median, confidence)
    return Interval(median, low, high, int(data.size))


@dataclasses.dataclass(frozen=True)
class Paired:
    """A against B on the same seeds: ``difference`` is the mean of (A - B) oriented so that positive means A is
    better, with its bootstrap interval; ``verdict`` is ``win``, ``tie``, ``loss`` or ``n too small``."""

    difference: float
    low: float | None
    high: float | None
    n: int
    verdict: str

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.difference):
            return "–"
        if self.low is None:
            return f"{self.difference:+.{digits}g} (n={self.n}: {TOO_FEW})"
        return f"{self.verdict} {self.difference:+.{digits}g} [{self.low:+.{digits}g}, {self.high:+.{digits}g}] (n={self.n})"


def paired_comparison(a: Mapping[int, float], b: Mapping[int, float], higher_is_better: bool,
                      confidence: float = CONFIDENCE) -> Paired:
    """Compare A with B over the seeds both have a finite value for (see the module docstring)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    sign = 1.0 if higher_is_better else -1.0
    diffs = np.asarray([sign * (a[s] - b[s]) for s in seeds], dtype=float)
    if diffs.size == 0:
        return Paired(math.nan, None, None, 0, TOO_FEW)
    mean = float(diffs.mean())
    if diffs.size < MIN_SEEDS:
        return Paired(mean, None, None, int(diffs.size), TOO_FEW)
    low, high = _bootstrap(diffs, np.mean, confidence)
    verdict = WIN if low > 0 else LOSS if high < 0 else TIE
    return Paired(mean, low, high, int(diffs.size), verdict)


@dataclasses.dataclass
class Ranking:
    """Methods ranked across configurations: ``average_ranks`` (1 = best), Friedman's p-value, Nemenyi's critical
    difference (two methods whose average ranks differ by less are not distinguishable), how many configurations
    (``n``) the ranks average over, and autorank's result (for its critical-difference diagram)."""

    average_ranks: pd.Series
    friedman_p: float | None
    critical_difference: float | None
    n: int
    result: object | None = None

    @property
    def distinguishable(self) -> bool:
        return self.friedman_p is not None and self.friedman_p < 1 - CONFIDENCE


def rank_methods(scores: pd.DataFrame, higher_is_better: bool) -> Ranking:
    """``scores``: one row per configuration (task configuration, budget, ...), one column per method, no missing
    values. Average ranks always; the Friedman test and Nemenyi's CD where there are at least ``MIN_METHODS`` (3)
    methods and ``MIN_CONFIGURATIONS`` (5, autorank's minimum) configurations (fewer: None)."""
    scores = scores.dropna(axis=0, how="any")
    ranks = scores.rank(axis=1, ascending=not higher_is_better, method="average")
    average = ranks.mean(axis=0).sort_values()
    if scores.shape[1] < MIN_METHODS or scores.shape[0] < MIN_CONFIGURATIONS:
        return Ranking(average, None, None, int(scores.shape[0]))
    from autorank import autorank

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # autorank prints what it does
        warnings.simplefilter("ignore")
        result = autorank(scores, alpha=1 - CONFIDENCE, verbose=False, force_mode="nonparametric",
                          order="descending" if higher_is_better else "ascending")
    return Ranking(average, float(result.pvalue), float(result.cd) if result.cd is not None else None,
                   int(scores.shape[0]), result)


def critical_difference_diagram(ranking: Ranking, path) -> bool:
    """Draw autorank's critical-difference diagram to ``path`` (PNG); False where the ranking has no test."""
    if ranking.result is None or ranking.critical_difference is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from autorank import plot_stats

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ax = plot_stats(ranking.result, allow_insignificant=True)
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(ax.figure)
    return True
