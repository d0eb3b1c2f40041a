"""Stable rank as a rank selector (Rudelson & Vershynin 2007): srank(W) = ||W||_F^2 / ||W||_2^2 = sum s_i^2 / s_1^2.

The stable rank never exceeds the rank and ignores small singular values; we use k = ceil(srank) per site.
Budget-free: rankbench runs it once per task configuration and seed, not once per budget.
"""

import math

from rankbench import PluginParams, RankProblem, Selector, hookimpl


class StableRank(Selector):
    name = "stable-rank"
    version = "1"
    description = "k = ceil(sum s_i^2 / s_1^2) per site (budget-free)"

    class Params(PluginParams):
        scale: float = 1.0  # multiply the stable rank before rounding up

    def uses_budget(self, budget_kind):
        return False

    def select(self, problem: RankProblem):
        ranks = {}
        for site in problem.sites:
            s = site.singular_values
            srank = float((s**2).sum() / s[0] ** 2)
            ranks[site.name] = max(1, min(site.max_rank, math.ceil(self.params.scale * srank)))
        return ranks


@hookimpl
def rankbench_register_selectors(register):
    register(StableRank)
