"""``farms``: layer-wise ratios from the heavy-tailedness of each weight's spectrum, measured without aspect-ratio bias
(``docs/algorithms.md#farms``).

Papers. FARMS -- Hu, Goel, Killiakov & Yang, "Eigenspectrum Analysis of Neural Networks without Aspect Ratio Bias"
(ICML 2025, arXiv 2506.06280) -- and the allocation it plugs into, AlphaPruning -- Lu, Zhou, Liu, Hu, Zhang, Mahoney &
Yang, "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise Pruning of Large Language
Models" (NeurIPS 2024, arXiv 2410.10912). Heavy-tailed self-regularisation (Martin & Mahoney): the empirical spectral
density (ESD) of a well-trained layer's correlation matrix WᵀW is heavy-tailed, p(λ) ~ λ^(-α), and a smaller α
(heavier tail) means a better-trained layer, which AlphaPruning prunes *less*.

1. FARMS ESD (data-free; W is the site's weight, out x in, read back from the paired factorization's decomposition,
   which reproduces it exactly at full rank). Submatrices of a fixed aspect ratio 1 : Q, of r rows and c = floor(Q r)
   columns, are taken on a regular grid of at most ``windows`` positions per dimension (row step
   max(1, floor((m - r) / (windows - 1))), start min(i * step, m - r); likewise for columns), and the eigenvalues
   λ = σ² of all of them are pooled into one sorted sample: the averaged ESD of the submatrices.
   Paper / reference-code defaults: r = 100, Q = 2, windows = 10 per dimension (up to 100 submatrices).
2. α by the Hill / maximum-likelihood estimator of a power law with xmin at the middle of the pooled ESD (the FARMS
   estimator's default ``fix_fingers='xmin_mid'``; AlphaPruning's own runs use ``xmin_peak``, xmin near the peak of
   the log-ESD histogram chosen by a Kolmogorov-Smirnov fit): with λ_(1) <= ... <= λ_(N) and i0 = floor(N / 2),

       α = 1 + n / ( Σ_{j >= i0} ln λ_(j) - n ln λ_(i0) ),     n = N - i0.

3. AlphaPruning's allocation. α is averaged over the sites of each transformer block (``mapping: block``, what
   AlphaPruning's LLM code does; the FARMS code makes it an option, ``mapping_type``; ``layer`` keeps per-site
   values) and mapped linearly around its range to
   per-site pruning weights

       w_l = (α_l - α_min) / (α_max - α_min) (s2 - s1) + s1,     s1 = 1 - ε, s2 = 1 + ε      (w_l = 1 if all equal),

   so a larger α (lighter tail, worse trained) is pruned more. Pruning fractions are c w_l with one global scale c:
   AlphaPruning's c0 = (1 - ρ) Σ n_l / Σ n_l w_l makes the parameter-weighted mean pruning fraction the target
   1 - ρ (ρ = ``param_ratio``, n_l the site's dense parameters). A site keeps the fraction ρ_l = clip(1 - c w_l, 0, 1)
   of its dense parameters: the largest rank k with params_at_rank(k) <= ρ_l n_l, at least 1.

Budget. Rounding ranks down keeps Σ params <= ρ Σ n_l at c0 unless a fraction was clipped or a site sits at rank 1;
then c is raised by bisection (60 halvings) to the smallest scale that fits. If rank 1 everywhere does not fit, every
site gets rank 1. Defaults: ε = 0.3 (AlphaPruning's LLaMA-7B script with magnitude pruning, the data-free pruner).

Deviations: (i) AlphaPruning allocates unstructured sparsity; here the same per-layer fractions are parameter
fractions of low-rank factors (ranks). (ii) A weight smaller than r x Q r (small models) is subsampled with the
largest r' = min(r, m, floor(n / Q)) rows and floor(Q r') columns, keeping the aspect ratio (the reference code slices
past the edge and gets a different ratio). (iii) Eigenvalues that are exactly zero are dropped before the logarithm.
(iv) Sites whose name has no numeric component (no block index) form a block of their own.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from rankbench.api import COMPRESSION, PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._allocation import memo, needs_svd_form, ones, param_limit, ratio_rank, total_params

BISECTION_STEPS = 60


def window_starts(size: int, window: int, windows: int) -> list[int]:
    """Start offsets of at most ``windows`` windows of length ``window`` on a regular grid over ``size``."""
    step = max(1, (size - window) // max(windows - 1, 1))
    count = min(windows, max(1, (size - window) // step + 1))
    return sorted({min(i * step, size - window) for i in range(count)})


def farms_eigenvalues(weight: np.ndarray, rows: int, aspect: float, windows: int) -> np.ndarray:
    """The pooled, ascending eigenvalues σ² of the fixed-aspect-ratio submatrices of ``weight`` (step 1 above)."""
    m, n = weight.shape
    r = max(1, min(rows, m, int(math.floor(n / aspect))))
    c = max(1, min(n, int(math.floor(aspect * r))))
    pooled = [
        np.linalg.svd(weight[i:i + r, j:j + c], compute_uv=False) ** 2
        for i in window_starts(m, r, windows)
        for j in window_starts(n, c, windows)
    ]
    return np.sort(np.concatenate(pooled))


def hill_alpha(eigenvalues: np.ndarray, xmin_position: float = 2.0) -> float:
    """Power-law exponent α by the Hill / MLE estimator with xmin = λ_(floor(N / xmin_position)) (step 2 above)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    lam = lam[lam > 0]
    if len(lam) < 2:
        raise ValueError("the ESD has fewer than two positive eigenvalues")
    i0 = int(len(lam) / xmin_position)
    tail = np.log(lam[i0:])
    n = len(tail)
    spread = float(tail.sum() - n * tail[0])
    return math.inf if spread <= 0 else 1.0 + n / spread


def block_of(site: str) -> str:
    """The transformer block a site belongs to: its name up to the first numeric component (itself if none)."""
    parts = site.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[: i + 1])
    return site


def pruning_weights(alphas: dict[str, float], epsilon: float) -> dict[str, float]:
    """AlphaPruning's linear map of α onto [1 - ε, 1 + ε] (all 1 when α is the same everywhere)."""
    lo, hi = min(alphas.values()), max(alphas.values())
    if not hi > lo:
        return dict.fromkeys(alphas, 1.0)
    return {name: (a - lo) / (hi - lo) * 2.0 * epsilon + 1.0 - epsilon for name, a in alphas.items()}


class FarmsSelector(Selector):
    name = "farms"
    version = "1"
    description = (
        "FARMS: power-law alpha of the averaged ESD of fixed-aspect-ratio submatrices, mapped to layer-wise ratios as "
        "in AlphaPruning (heavier tail, fewer parameters removed) under a param_ratio budget."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO})

    class Params(PluginParams):
        rows: int = Field(100, ge=1, description="rows of each submatrix (FARMS: 100)")
        aspect: float = Field(2.0, gt=0.0, description="submatrix columns / rows, Q (FARMS: 2)")
        windows: int = Field(10, ge=1, description="submatrix positions per dimension (FARMS: 10)")
        xmin_position: float = Field(2.0, ge=1.0, description="xmin = lambda_(N / xmin_position); 2: the median")
        epsilon: float = Field(0.3, ge=0.0, lt=1.0, description="AlphaPruning's range: weights in [1-eps, 1+eps]")
        mapping: Literal["block", "layer"] = Field("block", description="average alpha per block, or per site")

    def skip(self, task, factorization) -> str | None:
        return needs_svd_form(self, factorization)

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

    def site_alphas(self, problem: RankProblem) -> dict[str, float]:
        """α of every site (memoised for every budget of the same factorization)."""
        p = self.params
        key = ("farms-alpha", p.rows, p.aspect, p.windows, p.xmin_position)

        def compute() -> dict[str, float]:
            alphas = {}
            for site in problem.sites:
                weight = problem.stats.decomposition(site.name).matrix().detach().cpu().numpy()
                esd = farms_eigenvalues(weight, p.rows, p.aspect, p.windows)
                alphas[site.name] = hill_alpha(esd, p.xmin_position)
            return alphas

        return memo(problem, key, compute)

    def select(self, problem: RankProblem) -> Ranks:
        limit = param_limit(problem, self.name)
        alphas = self.site_alphas(problem)
        if self.params.mapping == "block":
            blocks: dict[str, list[float]] = {}
            for name, a in alphas.items():
                blocks.setdefault(block_of(name), []).append(a)
            alphas = {name: float(np.mean(blocks[block_of(name)])) for name in alphas}
        weights = pruning_weights(alphas, self.params.epsilon)
        return allocate(problem, weights, float(problem.budget), limit)


def allocate(problem: RankProblem, weights: dict[str, float], ratio: float, limit: float) -> dict[str, int]:
    """Ranks at AlphaPruning's scale c0, or at the smallest larger scale whose ranks fit ``limit`` (see the doc)."""

    def ranks_at(c: float) -> dict[str, int]:
        return {
            site.name: ratio_rank(site, min(max(1.0 - c * weights[site.name], 0.0), 1.0)) for site in problem.sites
        }

    dense = {site.name: site.dense_params for site in problem.sites}
    c0 = (1.0 - ratio) * sum(dense.values()) / sum(dense[name] * w for name, w in weights.items())
    if total_params(problem, ranks_at(c0)) <= limit:
        return ranks_at(c0)
    c_max = 1.0 / min(weights.values())  # every kept fraction is 0 here: rank 1 everywhere
    if total_params(problem, ranks_at(c_max)) > limit:
        return ones(problem)
    lo, hi = c0, c_max  # lo does not fit, hi does
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if total_params(problem, ranks_at(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    return ranks_at(hi)


@hookimpl
def rankbench_register_selectors(register):
    register(FarmsSelector)
