"""``evbmf``: rank from empirical variational Bayesian matrix factorization, Nakajima, Sugiyama, Babacan & Tomioka,
"Global analytic solution of fully-observed variational Bayesian matrix factorization", JMLR 14, 2013 (the
EVBMF rule; ``docs/algorithms.md#evbmf`` gives the pseudo-code followed here).

For an L x M matrix with L <= M (transpose otherwise), alpha = L/M, tau_bar = 2.5129 sqrt(alpha) and
x_bar = (1 + tau_bar)(1 + alpha/tau_bar). With the H = L singular values s_h (the full spectrum, so the residual
||Y||_F^2 - sum s_h^2 is 0) and x_h = s_h^2 / (M sigma^2), the noise variance sigma^2, if not given, minimises

    obj(sigma^2) = sum_{x_h <= x_bar} (x_h - log x_h)
                 + sum_{x_h >  x_bar} (x_h - tau(x_h) + log((tau(x_h) + 1)/x_h) + alpha log(tau(x_h)/alpha + 1))
                 + residual/(M sigma^2) + (L - H) log sigma^2,
    tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,

over [lower, upper] with upper = (sum s^2 + residual)/(L M), k0 = min(ceil(L/(1+alpha)) - 1, H) (0-based) and
lower = max(s_{k0}^2 / (M x_bar), mean(s_{k0:}^2)/M), by ``scipy.optimize.minimize_scalar(method="bounded")``.
The search runs on sigma^2 / upper (objective unchanged up to a constant) so that the minimiser's absolute tolerance
means the same at every scale of the data. Then

    threshold = sqrt(M sigma^2 x_bar),   k = #{ s_h > threshold },  at least 1, at most max_rank (per mode: I_n).

If a site gives fewer than L singular values, H = len(s) and the residual is taken as 0 (unknown).
Budget-free; a tensor site gets one rank per mode, from each mode unfolding's spectrum and dimensions.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from rankbench.api import PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._spectral import per_site

TAU_BAR_COEF = 2.5129
_FLOOR = 1e-30  # relative floor for s^2, so that exact zeros in a spectrum keep the objective finite


def _objective(sigma2: float, s2: np.ndarray, L: int, M: int, H: int, alpha: float, x_bar: float, residual: float):
    x = s2 / (M * sigma2)
    small = x <= x_bar
    xs, xl = x[small], x[~small]
    d = xl - (1.0 + alpha)
    tau = 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))
    return float(
        np.sum(xs - np.log(xs))
        + np.sum(xl - tau + np.log((tau + 1.0) / xl) + alpha * np.log(tau / alpha + 1.0))
        + residual / (M * sigma2)
        + (L - H) * math.log(sigma2)
    )


def evbmf_sigma2(s: np.ndarray, dims: tuple[int, int]) -> float:
    """The EVB estimate of the noise variance from a descending spectrum of an m x n matrix."""
    from scipy import optimize

    L, M = sorted(int(d) for d in dims)
    s2 = np.asarray(s, dtype=np.float64)[:L] ** 2
    s2 = np.maximum(s2, _FLOOR * s2.max())
    H = len(s2)
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    residual = 0.0
    upper = (s2.sum() + residual) / (L * M)
    k0 = min(math.ceil(L / (1.0 + alpha)) - 1, H)
    tail = s2[k0:] if k0 < H else s2[-1:]
    lower = max(s2[min(k0, H - 1)] / (M * x_bar), float(np.mean(tail)) / M)
    if not lower < upper:
        return float(upper)
    res = optimize.minimize_scalar(
        _objective,
        bounds=(lower / upper, 1.0),
        method="bounded",
        args=(s2 / upper, L, M, H, alpha, x_bar, residual / upper),
        options={"xatol": 1e-10},
    )
    return float(res.x) * upper


def evbmf_threshold(dims: tuple[int, int], sigma2: float) -> float:
    L, M = sorted(int(d) for d in dims)
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    return math.sqrt(M * sigma2 * (1.0 + tau_bar) * (1.0 + alpha / tau_bar))


def evbmf_rank(s: np.ndarray, dims: tuple[int, int], sigma2: float | None = None) -> int:
    """#{s_h > EVB threshold}, at least 1 (clipping to the rank cap is the caller's)."""
    s = np.asarray(s, dtype=np.float64)
    if not np.any(s > 0):
        return 1
    if sigma2 is None:
        sigma2 = evbmf_sigma2(s, dims)
    return max(int(np.count_nonzero(s > evbmf_threshold(dims, sigma2))), 1)


class EVBMFSelector(Selector):
    name = "evbmf"
    version = "1"
    description = "Nakajima et al. empirical variational Bayesian MF: rank = #{s > EVB threshold}, noise fitted."

    class Params(PluginParams):
        sigma2: float | None = Field(None, gt=0.0, description="known noise variance (None: estimate it by EVB)")

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def select(self, problem: RankProblem) -> Ranks:
        sigma2 = self.params.sigma2
        return {site.name: per_site(site, lambda s, dims: evbmf_rank(s, dims, sigma2)) for site in problem.sites}


@hookimpl
def rankbench_register_selectors(register):
    register(EVBMFSelector)
