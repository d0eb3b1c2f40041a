"""``uniform``: the same budget share for every site, with no look at the spectrum.

Implements the parameter-ratio rank rule used with truncated SVD by SVD-LLM (Wang et al., ICLR 2025) and ASVD
(Yuan et al., 2023; ``docs/algorithms.md#parameter-ratio-rule``): for a kept-parameter fraction rho a rank-k factor
pair of an m x n weight stores k(m+n) parameters, so

    k = floor(rho * m * n / (m + n)),   clipped to [1, min(m, n)].

In general (any ``Site.params_at_rank``) k is the largest rank with ``params_at_rank(k) <= rho * dense_params``,
compared literally in floating point.

Budget kinds:

``param_ratio``  the rule above, per site (a tensor site: the largest common k <= max_n I_n with
                 params_at_rank(k) <= rho * dense_params, then each mode min(k, I_n)).
``rank_cap``     k = min(int(budget), max_rank) for every site (every mode of a tensor: min(cap, I_n)).
``rank_total``   int(budget) split as evenly as possible over the sites, the remainder one each to the first
                 sites; a share above a site's max_rank (a tensor: its largest mode) is capped there and the surplus
                 split again over the other sites (water-filling), so the whole budget is used while any site has
                 room; every site keeps at least rank 1.

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
                k = largest_fitting(
                    lambda r, site=site: site_cost(site, broadcast_rank(site, r)), limit, rank_limit(site)
                )
                ranks[site.name] = broadcast_rank(site, k)
            return ranks
        if kind == RANK_CAP:
            return {site.name: broadcast_rank(site, int(budget)) for site in problem.sites}
        shares = water_fill(int(budget), [rank_limit(site) for site in problem.sites])
        return {site.name: broadcast_rank(site, k) for site, k in zip(problem.sites, shares)}


def water_fill(total: int, caps: list[int]) -> list[int]:
    """``total`` split as evenly as possible (remainders to the first), capped per entry, surplus split again."""
    shares = [0] * len(caps)
    active, left = list(range(len(caps))), max(int(total), 0)
    while left > 0 and active:
        base, extra = divmod(left, len(active))
        still_open = []
        for position, i in enumerate(active):
            take = min(base + (1 if position < extra else 0), caps[i] - shares[i])
            shares[i] += take
            left -= take
            if shares[i] < caps[i]:
                still_open.append(i)
        if len(still_open) == len(active):
            break  # nobody was capped: the budget is spent
        active = still_open
    return [max(k, 1) for k in shares]


@hookimpl
def rankbench_register_selectors(register):
    register(UniformSelector)
