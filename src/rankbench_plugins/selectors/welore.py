"""``welore``: one global threshold on normalised spectra -- Jaiswal, Yin, Wang et al., "From GaLore to WeLore: How
Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients" (2024); ``docs/algorithms.md#welore`` (reference
code VITA-Group/WeLore, ``adaptive_rank_pruning``).

Per site, with the descending spectrum s_1 >= ... >= s_p of the matrix the factorization truncates (the weight for
``svd``; the scaled / whitened matrix for ``asvd`` / ``svd-llm``, since that is the spectrum the site's rank cuts):

    s~_i = (s_i - min s) / (max s - min s),     prune(t) = #{ i : s~_i < t },     k(t) = p - prune(t),

clipped to [1, max_rank]. A flat spectrum (max s = min s) has nothing to normalise: it is read as s~ = 1
throughout (nothing pruned for t <= 1).

One threshold t is shared by all sites. WeLore tabulates t against the target rank reduction for LLaMA-2-7B and
says to search t for other models; here t is found by bisection for the budget (``param_ratio`` rho):

    t* = min { t : sum_sites params_at_rank(k_site(t)) <= rho * sum_sites dense_params }.

k_site(t) only changes when t passes one of the normalised values, so the bisection runs over the sorted distinct
s~ values of all sites (plus +inf, where every site is at rank 1) and is exact: lowering t to the next
candidate would exceed the budget. If even rank 1 everywhere does not fit, every site gets rank 1.

Deviation from WeLore: WeLore factorises a matrix only when prune/rank > ``min_ratio`` and leaves the others dense
(non-low-rank components). In this harness every site is factorized, so the rank rule above is applied to every
site, including those WeLore would keep dense (a site keeping its full rank p stores p(m+n) > mn parameters).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from rankbench.api import COMPRESSION, PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._allocation import needs_svd_form, ones, param_limit, total_params
from rankbench_plugins.selectors._spectral import clip_rank, site_spectra


def normalised_spectrum(s: np.ndarray) -> np.ndarray:
    """s~ = (s - min s) / (max s - min s); all ones for a flat spectrum."""
    s = np.asarray(s, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return np.ones_like(s)
    return (s - lo) / (hi - lo)


def welore_rank(normalised: np.ndarray, t: float, cap: int) -> int:
    """k(t) = p - #{s~ < t}, clipped to [1, cap]."""
    return clip_rank(len(normalised) - int(np.count_nonzero(normalised < t)), cap)


class WeLoreSelector(Selector):
    name = "welore"
    version = "1"
    description = (
        "WeLore: one global threshold t on min-max normalised spectra, k = #{s~ >= t}, t bisected to the budget."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO})

    class Params(PluginParams):
        pass

    def skip(self, task, factorization) -> str | None:
        return needs_svd_form(self, factorization)

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

    def select(self, problem: RankProblem) -> Ranks:
        limit = param_limit(problem, self.name)
        spectra = {}
        for site in problem.sites:
            s, _dims, cap = site_spectra(site)[0]
            spectra[site.name] = (normalised_spectrum(s), cap)
        return threshold_ranks(problem, spectra, limit)


def threshold_ranks(problem: RankProblem, spectra: dict, limit: float) -> dict[str, int]:
    """Ranks at the smallest candidate threshold that fits (see the module doc)."""

    def ranks_at(t: float) -> dict[str, int]:
        return {name: welore_rank(norm, t, cap) for name, (norm, cap) in spectra.items()}

    candidates = np.unique(np.concatenate([norm for norm, _cap in spectra.values()] + [np.array([np.inf])]))
    # ranks_at(candidates[j]) is non-increasing in j; candidates[-1] = inf gives rank 1 everywhere.
    if total_params(problem, ranks_at(float(candidates[-1]))) > limit:
        return ones(problem)
    lo, hi = 0, len(candidates) - 1  # find the smallest index that fits; hi fits
    while lo < hi:
        mid = (lo + hi) // 2
        if total_params(problem, ranks_at(float(candidates[mid]))) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(float(candidates[lo]))


@hookimpl
def rankbench_register_selectors(register):
    register(WeLoreSelector)
