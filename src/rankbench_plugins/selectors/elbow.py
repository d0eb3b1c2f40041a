"""``elbow``: an energy floor combined with the elbow (knee) of the singular-value curve
(``docs/algorithms.md#elbow``).

Source. SoKA -- Chong & Qu, "Singular Value Decomposition on Kronecker Adaptation for Large Language Models"
(arXiv 2506.15251, 2025) -- selects the rank of its Kronecker adapters with "energy-threshold and elbow-point
criteria". The stored copies of the paper that could be read here give only that sentence, not the exact elbow rule
nor how the two criteria are combined, so this selector implements the standard construction that those words name,
and is named for what it is (an energy floor plus a Kneedle-style knee), not a reproduction of SoKA's code:

* Elbow (Kneedle, Satopää, Albrecht, Irwin & Raghavan, ICDCS workshops 2011, on the scree curve). With the
  descending spectrum s_1 >= ... >= s_p, normalise the points (i, s_i), i = 1..p, to the unit square,

      x_i = (i - 1) / (p - 1),     y_i = (s_i - s_p) / (s_1 - s_p),

  so that the curve runs from (0, 1) to (1, 0) and the chord between its end points is y = 1 - x. The elbow is the
  point farthest below the chord, i* = argmax_i (1 - x_i - y_i) (the perpendicular distance is this over sqrt 2;
  ties go to the smaller i). As in Cattell's scree test, the components *before* the elbow are kept:
  k_elbow = i* - 1 (at least 1). A spectrum with r large values on a flat floor has its elbow at the first floor
  point, i* = r + 1, so k_elbow = r. A flat spectrum (s_1 = s_p), or one with p <= 2, has no elbow: k_elbow = p.
* Energy floor (the ``energy`` selector's rule): k_energy = min{ k : sum_{i<=k} s_i^2 >= eta sum_i s_i^2 }.
* Rank: k = max(k_elbow, k_energy), clipped to [1, max_rank] -- the elbow prunes the negligible tail, and the
  floor keeps at least a fraction eta of the energy where the elbow sits too early (a single dominant value on a
  slowly decaying bulk puts it at 1).

Parameters: ``eta`` = 0.9 (the energy floor; 0 switches the floor off). Budget-free; a tensor site gets one rank per
mode, from each mode unfolding's spectrum.

Deviations: the combination max(elbow, energy) and the default eta are this implementation's choices (see above);
SoKA applies its rule to the spectrum of a Kronecker-product SVD of a weight update, here it is applied to the
spectrum of the matrix that the paired factorization truncates (the weight for ``svd``, the whitened weight for
``svd-llm``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from rankbench.api import PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._spectral import energy_fractions, energy_rank, per_site


def elbow_rank(s) -> int:
    """k_elbow = i* - 1 for the point i* (1-based) of the normalised scree curve farthest below its chord."""
    s = np.asarray(s, dtype=np.float64)
    p = len(s)
    if p <= 2 or s[0] <= s[-1]:
        return p
    x = np.arange(p, dtype=np.float64) / (p - 1)
    y = (s - s[-1]) / (s[0] - s[-1])
    farthest = int(np.argmax(1.0 - x - y))  # 0-based index of the elbow point: i* - 1
    return max(farthest, 1)


def elbow_energy_rank(s, eta: float) -> int:
    """max(k_elbow, k_energy(eta)); eta = 0 leaves the elbow alone."""
    k_energy = energy_rank(energy_fractions(s), eta) if eta > 0 else 1
    return max(elbow_rank(s), k_energy)


class ElbowSelector(Selector):
    name = "elbow"
    version = "1"
    description = "Kneedle elbow of the scree curve (keep the components before it) with an energy floor eta; budget-free."

    class Params(PluginParams):
        eta: float = Field(0.9, ge=0.0, le=1.0, description="energy floor: keep at least this fraction of sum s_i^2")

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def select(self, problem: RankProblem) -> Ranks:
        eta = float(self.params.eta)
        return {site.name: per_site(site, lambda s, _dims: elbow_energy_rank(s, eta)) for site in problem.sites}


@hookimpl
def rankbench_register_selectors(register):
    register(ElbowSelector)
