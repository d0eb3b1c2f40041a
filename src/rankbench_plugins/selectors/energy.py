"""``energy``: the smallest rank that keeps a fraction eta of the spectral energy
(``docs/algorithms.md#energy-threshold``).

Energy-threshold rank rule, as used e.g. by SVFit ("top-r singular values hold > 99 % of the information") and
SoKA; no single originating paper. With singular values s_1 >= ... >= s_p,

    c_k = sum_{i<=k} s_i^2 / sum_i s_i^2,        k(eta) = min{ k : c_k >= eta }.

Budget-free (any budget kind other than ``param_ratio``, or none): k = k(eta) with the parameter ``eta``.

Under ``param_ratio`` (kept fraction rho) one global threshold eta is shared by all sites and chosen by bisection
on [0, 1] (60 halvings, deterministic) as the largest eta with

    sum_sites params_at_rank(k_site(eta)) <= rho * sum_sites dense_params.

Since k_site(eta) is non-decreasing in eta, this gives the largest total that fits among the rank profiles that a
common energy threshold can produce. If even rank 1 everywhere exceeds the budget, every site gets rank 1.
Tensor sites apply the rule to each mode's spectrum and are charged ``params_at_rank(max mode rank)``.
"""

from __future__ import annotations

from pydantic import Field

from rankbench.api import PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._spectral import (
    clip_rank,
    energy_fractions,
    energy_rank,
    is_tensor,
    site_cost,
    site_spectra,
)

BISECTION_STEPS = 60


def _ranks_at(fractions, eta: float) -> dict:
    """Ranks of all sites at threshold eta; ``fractions`` maps site -> [(c, cap), ...] (one per mode)."""
    out = {}
    for site, modes in fractions:
        ks = tuple(clip_rank(energy_rank(c, eta), cap) for c, cap in modes)
        out[site.name] = ks if is_tensor(site) else ks[0]
    return out


class EnergySelector(Selector):
    name = "energy"
    version = "1"
    description = "Smallest rank keeping a fraction eta of sum s_i^2; under param_ratio one global eta fits the budget."

    class Params(PluginParams):
        eta: float = Field(0.95, gt=0.0, le=1.0, description="energy fraction to keep (budget-free mode)")

    def uses_budget(self, budget_kind: str | None) -> bool:
        return budget_kind == PARAM_RATIO

    def select(self, problem: RankProblem) -> Ranks:
        fractions = [
            (site, [(energy_fractions(s), cap) for s, _dims, cap in site_spectra(site)]) for site in problem.sites
        ]
        if problem.budget_kind != PARAM_RATIO or problem.budget is None:
            return _ranks_at(fractions, float(self.params.eta))

        limit = float(problem.budget) * problem.dense_params
        sites = {site.name: site for site in problem.sites}

        def total(eta: float) -> int:
            return sum(site_cost(sites[name], k) for name, k in _ranks_at(fractions, eta).items())

        lo, hi = 0.0, 1.0
        if total(hi) <= limit:
            return _ranks_at(fractions, hi)
        # Invariant: total(lo) fits (or lo = 0, where every site has rank 1), total(hi) does not.
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if total(mid) <= limit:
                lo = mid
            else:
                hi = mid
        return _ranks_at(fractions, lo)


@hookimpl
def rankbench_register_selectors(register):
    register(EnergySelector)
