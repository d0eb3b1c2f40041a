"""``uniform``: the same budget share for every site, with no look at the spectrum.

Implements the parameter-ratio rank rule used with truncated SVD by SVD-LLM (Wang et al., ICLR 2025) and ASVD
(Yuan et al., 2023), ALGORITHMS.md §1.1: for a kept-parameter fraction rho a rank-k factor pair of an m x n weight
stores k(m+n) parameters, so

    k = floor(rho * m * n / (m + n)),   clipped to [1, min(m, n)].

In general (any ``Site.params_at_rank``) k is the largest rank with ``params_at_rank(k) <= rho * dense_params``,
compared literally in floating point.

Budget kinds:

``param_ratio``  the rule above, per site (a tensor site: the largest common k <= max_n I_n with
                 params_at_rank(k) <= rho * dense_params, then each mode min(k, I_n)).
``rank_cap``     k = min(int(budget), max_rank) for every site (every mode of a tensor: min(cap, I_n)).
``rank_total``   int(budget) split as evenly as possible over the sites, the remainder one each to the first
                 sites; each share clipped to [1, max_rank] (clipped surplus is not redistributed).

Without a budget the selector has nothing to go on, so budget-free tasks skip it (``budget_kinds`` has no None).
"""

from __future__ import annotations

from typing import ClassVar

from rankbench.api import PARAM_RATIO, RANK_CAP, RANK_TOTAL, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._spectral import broadcast_rank, largest_fitting, rank_limit, site_cost

_KINDS = frozenset({PARAM_RATIO, RANK_CAP, RANK_TOTAL})


class UniformSelector(Selector):
    name = "uniform"
    version = "1"
    description = "Same budget share per site: k = floor(rho*m*n/(m+n)), a rank cap, or an even split of a total rank."
    budget_kinds: ClassVar[frozenset[str | None]] = _KINDS

    class Params(PluginParams):
        pass

    def uses_budget(self, budget_kind: str | None) -> bool:
        return budget_kind in _KINDS

    def select(self, problem: RankProblem) -> Ranks:
        kind, budget = problem.budget_kind, problem.budget
        if kind not in _KINDS:
            raise ValueError(f"uniform needs a budget of kind {sorted(_KINDS)}, got {kind!r}")
        if budget is None:
            raise ValueError(f"uniform needs a budget value for budget kind {kind!r}")
        if kind == PARAM_RATIO:
            ranks = {}
            for site in problem.sites:
                limit = float(budget) * site.dense_params
                k = largest_fitting(lambda r, site=site: site_cost(site, r), limit, rank_limit(site))
                ranks[site.name] = broadcast_rank(site, k)
            return ranks
        if kind == RANK_CAP:
            return {site.name: broadcast_rank(site, int(budget)) for site in problem.sites}
        total, n = int(budget), len(problem.sites)
        base, extra = divmod(total, n) if n else (0, 0)
        return {site.name: broadcast_rank(site, base + (1 if i < extra else 0)) for i, site in enumerate(problem.sites)}


@hookimpl
def rankbench_register_selectors(register):
    register(UniformSelector)
