"""``oht``: the optimal hard threshold for singular values of Gavish & Donoho, "The optimal hard threshold for
singular values is 4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 2014 (``docs/algorithms.md#optimal-hard-threshold``).

Model Y = X + sigma Z (m x n, i.i.d. unit-variance noise Z), beta = min(m, n) / max(m, n), N = max(m, n),
k = #{ s_i > tau }, at least 1, at most max_rank (per mode: I_n).

Known sigma (the ``sigma`` parameter, else ``Site.noise_sigma``):

    tau = lambda*(beta) sqrt(N) sigma,
    lambda*(beta) = sqrt( 2(beta+1) + 8 beta / ((beta+1) + sqrt(beta^2 + 14 beta + 1)) ),   lambda*(1) = 4/sqrt(3).

Unknown sigma:

    tau = omega(beta) median(s),   omega(beta) = lambda*(beta) / sqrt(mu_beta),

the median taken over the whole spectrum (all min(m, n) singular values), and mu_beta the median of the
Marchenko-Pastur law with ratio beta, density sqrt((b-t)(t-a)) / (2 pi beta t) on [a, b] = [(1-sqrt beta)^2,
(1+sqrt beta)^2]. mu_beta is computed, not approximated: the CDF by ``scipy.integrate.quad`` (after the substitution
t = a + u^2, which removes the endpoint singularity at beta = 1) and its 1/2-crossing by ``scipy.optimize.brentq``.
The paper's cubic fit omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43 is kept only as a cross-check.

Budget-free; a tensor site gets one rank per mode, each from the spectrum and dimensions of the mode unfolding.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from pydantic import Field

from rankbench.api import PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._spectral import per_site


def lambda_star(beta: float) -> float:
    """Optimal threshold coefficient for known noise level (in units of sqrt(N) sigma)."""
    beta = float(beta)
    return math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta * beta + 14.0 * beta + 1.0)))


def marchenko_pastur_cdf(x: float, beta: float) -> float:
    """P(T <= x) for the Marchenko-Pastur law with ratio 0 < beta <= 1 (no atom at 0)."""
    from scipy import integrate

    a, b = (1.0 - math.sqrt(beta)) ** 2, (1.0 + math.sqrt(beta)) ** 2
    if x <= a:
        return 0.0
    if x >= b:
        return 1.0
    width = b - a

    # t = a + u^2, dt = 2u du: density dt = u^2 sqrt(width - u^2) / (pi beta (a + u^2)) du, bounded on [0, sqrt(width)]
    def integrand(u: float) -> float:
        return u * u * math.sqrt(max(width - u * u, 0.0)) / (math.pi * beta * (a + u * u))

    value, _err = integrate.quad(integrand, 0.0, math.sqrt(x - a), epsabs=1e-13, epsrel=1e-12, limit=200)
    return float(value)


@functools.lru_cache(maxsize=4096)
def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with ratio beta in (0, 1]."""
    from scipy import optimize

    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    a, b = (1.0 - math.sqrt(beta)) ** 2, (1.0 + math.sqrt(beta)) ** 2
    return float(optimize.brentq(lambda x: marchenko_pastur_cdf(x, beta) - 0.5, a, b, xtol=1e-14, rtol=1e-13))


def omega(beta: float) -> float:
    """Optimal threshold coefficient for unknown noise level (in units of the median singular value)."""
    return lambda_star(beta) / math.sqrt(marchenko_pastur_median(beta))


def omega_approx(beta: float) -> float:
    """Gavish & Donoho's cubic fit of omega(beta); used only as a cross-check."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def oht_threshold(s: np.ndarray, dims: tuple[int, int], sigma: float | None) -> float:
    m, n = dims
    big = max(m, n)
    beta = min(m, n) / big
    if sigma is not None:
        return lambda_star(beta) * math.sqrt(big) * float(sigma)
    return omega(beta) * float(np.median(s))


def oht_rank(s: np.ndarray, dims: tuple[int, int], sigma: float | None = None) -> int:
    """#{s_i > tau}, at least 1 (clipping to the rank cap is the caller's)."""
    s = np.asarray(s, dtype=np.float64)
    return max(int(np.count_nonzero(s > oht_threshold(s, dims, sigma))), 1)


class OHTSelector(Selector):
    name = "oht"
    version = "1"
    description = "Gavish-Donoho optimal hard threshold on singular values (known or median-estimated noise)."

    class Params(PluginParams):
        sigma: float | None = Field(
            None, ge=0.0, description="per-entry noise std; overrides the site's noise_sigma (None: that, or estimated)"
        )

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def select(self, problem: RankProblem) -> Ranks:
        ranks = {}
        for site in problem.sites:
            sigma = self.params.sigma if self.params.sigma is not None else site.noise_sigma
            ranks[site.name] = per_site(site, lambda s, dims, sigma=sigma: oht_rank(s, dims, sigma))
        return ranks


@hookimpl
def rankbench_register_selectors(register):
    register(OHTSelector)
