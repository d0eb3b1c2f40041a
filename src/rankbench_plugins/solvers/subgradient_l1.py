"""Solver ``subgradient-l1``: subgradient methods on the l1 loss, for sensing with outliers and robust PCA.

    sensing  f(X) = sum_k |<A_k, X> - y_k|,   subgradient Z = mat(A^T sign(A vec(X) - y))
    robust   f(X) = sum_ij |X_ij - Y_ij|,     subgradient Z = sign(X - Y)

``step_rule: polyak`` (the default whenever the ground truth is known, i.e. on synthetic problems): the scaled
subgradient method of Tong, Ma & Chi (JMLR 2021; their ``matrix_l1`` experiment) with Polyak's step size

    f* = f(X*)  (known in synthetic runs)
    eta = (f(L R^T) - f*) / ( <Z^T L, Z^T L (L^T L)^{-1}> + <Z R, Z R (R^T R)^{-1}> )
    L <- L - eta Z R (R^T R)^{-1} ;  R <- R - eta Z^T L (L^T L)^{-1}

from a spectral initialisation that uses only the measurements least likely to be outliers: the (1 - p) fraction
with the smallest |y_k| (p = the problem's outlier fraction), back-projected as (m / |S|) A_S^T y_S; for robust PCA
the spectral initialisation of Y - T(Y) as in ScaledGD.

``step_rule: geometric`` (the fallback when f* is unknown): the small-initialisation subgradient method of Ma &
Fattahi, "Global convergence of sub-gradient method for robust matrix recovery: small initialization, noisy
measurements, and over-parameterization" (arXiv 2202.08788): L0, R0 = alpha sqrt(sigma1 / n) B and

    L <- L - eta_t D R ;  R <- R - eta_t D^T L,    D = Z / ||Z||_F,   eta_t = eta0 rho^t

The geometric step form eta_t = eta0 rho^t is unverified against the paper; the normalised direction D (which makes
eta dimensionless) and the asymmetric factorisation L R^T (the paper analyses U U^T) are this harness's choices.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.recovery import RecoverySolver
from rankbench_plugins.solvers._factored import (
    Clock,
    Objective,
    finish,
    generator,
    iterate,
    small_factor,
    spectral_factors,
    top_singular_value,
)


def scaled(G: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    return G @ torch.linalg.pinv(F.T @ F, hermitian=True)


class L1Loss:
    """f and a subgradient of the l1 loss of a sensing or robust problem."""

    def __init__(self, obj: Objective):
        self.obj = obj

    def residual(self, X: torch.Tensor) -> torch.Tensor:
        if self.obj.kind == "sensing":
            return self.obj.A @ X.reshape(-1) - self.obj.y
        return X - self.obj.Y

    def value(self, X: torch.Tensor) -> float:
        return float(self.residual(X).abs().sum())

    def subgradient(self, X: torch.Tensor) -> tuple[torch.Tensor, float]:
        r = self.residual(X)
        if self.obj.kind == "sensing":
            return (self.obj.A.T @ torch.sign(r)).reshape(self.obj.shape), float(r.abs().sum())
        return torch.sign(r), float(r.abs().sum())


class SubgradientL1(RecoverySolver):
    name = "subgradient-l1"
    version = "1"
    description = "l1-loss scaled subgradient with Polyak step (Tong-Ma-Chi) or small-init geometric steps (Ma-Fattahi)"
    problems = frozenset({"sensing", "robust"})

    class Params(PluginParams):
        step_rule: Literal["auto", "polyak", "geometric"] = "auto"
        step: float = Field(0.5, gt=0, description="eta0 of the geometric rule (dimensionless)")
        decay: float = Field(0.98, gt=0, le=1, description="rho of the geometric rule")
        init: Literal["spectral", "small"] | None = Field(
            None, description="default: spectral for the Polyak rule, small for the geometric rule"
        )
        init_scale: float = Field(0.1, gt=0, description="alpha of the small init (factor norm / true factor norm)")
        rank_multiplier: int = Field(1, ge=1, description="fit rank x rank_multiplier columns (over-parameterisation)")
        outlier_margin: float = Field(4.0, ge=0, description="robust: z of the outlier threshold (see _factored)")

    def init_matrix(self, obj: Objective) -> torch.Tensor:
        if obj.kind != "sensing":
            return obj.init_matrix()
        m = obj.y.numel()
        keep = max(1, int(round((1.0 - obj.problem.outlier_fraction) * m)))
        chosen = torch.argsort(obj.y.abs())[:keep]
        return (m / keep) * (obj.A[chosen].T @ obj.y[chosen]).reshape(obj.shape)

    def solve(self, problem, rank, *, seed, device, max_iters, tol):
        p = self.params
        clock = Clock(device)
        obj = Objective(problem, device, p.outlier_margin)
        loss = L1Loss(obj)
        rule = p.step_rule
        if rule == "auto":
            rule = "polyak" if problem.target is not None else "geometric"
        if rule == "polyak" and problem.target is None:
            raise ValueError("the Polyak step needs f* = f(X*), i.e. a synthetic problem")
        init = p.init or ("spectral" if rule == "polyak" else "small")
        k = int(rank) * p.rank_multiplier
        M = self.init_matrix(obj)
        if init == "spectral":
            L, R = spectral_factors(M, k)
        else:
            gen, sigma1 = generator(seed), top_singular_value(M)
            L = small_factor(M.shape[0], k, p.init_scale, sigma1, gen, device)
            R = small_factor(M.shape[1], k, p.init_scale, sigma1, gen, device)
        f_star = loss.value(obj.target) if rule == "polyak" else math.nan
        state = {"L": L, "R": R}

        def polyak(t):
            L, R = state["L"], state["R"]
            Z, f = loss.subgradient(L @ R.T)
            gl, gr = Z @ R, Z.T @ L
            sl, sr = scaled(gl, R), scaled(gr, L)
            denominator = float((gr * sr).sum() + (gl * sl).sum())
            if denominator <= 0 or f <= f_star:
                return
            eta = (f - f_star) / denominator
            state["L"], state["R"] = L - eta * sl, R - eta * sr

        def geometric(t):
            L, R = state["L"], state["R"]
            Z, _ = loss.subgradient(L @ R.T)
            norm = float(torch.linalg.norm(Z))
            if norm == 0:
                return
            eta = p.step * p.decay**t / norm
            state["L"], state["R"] = L - eta * (Z @ R), R - eta * (Z.T @ L)

        errors, times, iterations, converged = iterate(
            polyak if rule == "polyak" else geometric,
            lambda: obj.error(state["L"], state["R"]),
            max_iters=max_iters,
            tol=tol,
            clock=clock,
        )
        return finish(state["L"], state["R"], errors, times, iterations, converged)


@hookimpl
def rankbench_register_factorizations(register):
    register(SubgradientL1)
