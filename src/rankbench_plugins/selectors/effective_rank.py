"""``effective-rank``: the entropy-based effective rank of Roy & Vetterli, "The effective rank: a measure of
effective dimensionality", EUSIPCO 2007 (``docs/algorithms.md#effective-rank``).

With singular values s_1, ..., s_p (the whole spectrum, zeros included):

    p_i = s_i / sum_j s_j,     H = -sum_i p_i log p_i   (0 log 0 = 0),     erank = exp(H),   1 <= erank <= p.

The rank is erank rounded half up, k = floor(erank + 1/2) (so 2.5 -> 3), clipped to [1, max_rank] (per mode:
[1, I_n]). An all-zero spectrum gives k = 1. Budget-free; tensor sites get one rank per mode, from each mode
unfolding's spectrum.
"""

from __future__ import annotations

import numpy as np

from rankbench.api import PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._spectral import per_site, round_half_up


def effective_rank(s) -> float:
    """Roy & Vetterli's erank = exp(entropy of s / sum(s)); 1.0 for an all-zero spectrum."""
    s = np.abs(np.asarray(s, dtype=np.float64).reshape(-1))
    total = s.sum()
    if total <= 0:
        return 1.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


class EffectiveRankSelector(Selector):
    name = "effective-rank"
    version = "1"
    description = "Roy-Vetterli effective rank exp(entropy of s/sum s), rounded half up; budget-free."

    class Params(PluginParams):
        pass

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def select(self, problem: RankProblem) -> Ranks:
        return {
            site.name: per_site(site, lambda s, _dims: round_half_up(effective_rank(s))) for site in problem.sites
        }


@hookimpl
def rankbench_register_selectors(register):
    register(EffectiveRankSelector)
