"""``sensitivity``: ASVD's sensitivity-based truncation rank search (STRS) -- Yuan, Shang, Song et al., "ASVD:
Activation-aware Singular Value Decomposition for Compressing Large Language Models" (2023); ``docs/algorithms.md#asvd``
(reference code hahnyuan/ASVD4LLM, ``sensitivity.py`` and ``binary_search.py``).

Sensitivity table. For every site l and every parameter ratio r in ``ratios`` (default 0.1, 0.2, ..., 0.9):

    k_l(r)   = largest k with params_at_rank(k) <= r * dense_params_l       (at least 1)
    ppl(l,r) = exp( mean calibration loss with ONLY site l truncated to k_l(r), every other site dense )

using the task's ``calibration_loss`` statistic (its calibration set; ASVD uses 16-32 WikiText-2 sequences).
That is sites x ratios calibration evaluations (fewer where two ratios give the same rank).

STRS. Sort all (l, r, ppl) by ppl descending (ties: site order, then ratio). For a cut index c, every site takes
the smallest ratio among its entries in the tail [c, N) -- the least harmful truncations -- and ratio 1.0 when it
has none (ASVD leaves such a layer dense; here every site is factorized, so it gets k_l(1.0) = floor(mn/(m+n))
for a plain SVD). The parameter total never decreases with c, and a binary search takes the largest c with

    sum_l params_at_rank(k_l) <= rho * sum_l dense_params_l          (budget kind ``param_ratio``).

ASVD's loop compares the ratio-weighted parameter estimate sum r_l * dense_l with the target; here the exact cost
of the chosen ranks is compared, so the budget is met literally. ASVD's alternative stopping rule (a perplexity
target) is not offered. If even c = 0 (every site at its smallest ratio) does not fit, every site gets rank 1.

Caching. The table does not depend on the budget: it is computed once per task configuration, factorization and
worker process and reused by every budget and cell -- through ``_allocation.memo``, keyed by the identity of the
decompositions the task memoises (a stopgap until the protocol offers a selector-side store). The memo holds the
loss of every (site, rank) evaluated, so parameter variants with overlapping ratios share evaluations too.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field, field_validator

from rankbench.api import COMPRESSION, PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._allocation import memo, needs_svd_form, param_limit, ratio_rank, strs_search

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class SensitivitySelector(Selector):
    name = "sensitivity"
    version = "1"
    description = "ASVD's STRS: per-site perplexity table over parameter ratios, then a binary-searched global cut."
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO})

    class Params(PluginParams):
        ratios: tuple[float, ...] = Field(DEFAULT_RATIOS, description="parameter ratios tried per site")
        calib_batches: int | None = Field(
            None, ge=1, description="calibration batches per evaluation (None: all; fewer makes the table cheaper)"
        )

        @field_validator("ratios")
        @classmethod
        def _check(cls, value):
            if not value or any(not 0.0 < r <= 1.0 for r in value):
                raise ValueError("ratios must be a non-empty list of numbers in (0, 1]")
            return tuple(sorted(set(float(r) for r in value)))

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

    def skip(self, task, factorization) -> str | None:
        return needs_svd_form(self, factorization)

    def table(self, problem: RankProblem) -> list[tuple[int, float, float]]:
        """(site index, ratio, perplexity) for every site and ratio, from the memoised (site, rank) losses."""
        losses: dict[tuple[str, int], float] = memo(problem, ("sensitivity-losses", self.params.calib_batches), dict)
        evaluate = None
        rows = []
        for index, site in enumerate(problem.sites):
            for ratio in self.params.ratios:
                k = ratio_rank(site, ratio)
                if (site.name, k) not in losses:
                    if evaluate is None:
                        evaluate = problem.stats.calibration_loss
                    losses[(site.name, k)] = float(evaluate({site.name: k}, self.params.calib_batches))
                rows.append((index, ratio, _perplexity(losses[(site.name, k)])))
        return rows

    def select(self, problem: RankProblem) -> Ranks:
        limit = param_limit(problem, self.name)
        ranks, _cut = strs_search(self.table(problem), problem.sites, limit)
        return ranks


def _perplexity(loss: float) -> float:
    """exp(loss); a non-finite or overflowing loss reads as an infinite perplexity (sorted as the most harmful)."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


@hookimpl
def rankbench_register_selectors(register):
    register(SensitivitySelector)
