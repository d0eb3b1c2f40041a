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

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench_plugins.solvers._factored import FactoredSolver, Objective, scaled

if TYPE_CHECKING:
    import torch


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
        import torch

        r = self.residual(X)
        if self.obj.kind == "sensing":
            return (self.obj.A.T @ torch.sign(r)).reshape(self.obj.shape), float(r.abs().sum())
        return torch.sign(r), float(r.abs().sum())


class SubgradientL1(FactoredSolver):
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
        import torch

        if obj.kind != "sensing":
            return obj.init_matrix()
        m = obj.y.numel()
        keep = max(1, int(round((1.0 - obj.problem.outlier_fraction) * m)))
        chosen = torch.argsort(obj.y.abs())[:keep]
        return (m / keep) * (obj.A[chosen].T @ obj.y[chosen]).reshape(obj.shape)

    def rule(self, problem) -> str:
        """The step rule: ``step_rule``, with ``auto`` resolved (Polyak whenever f* is known)."""
        rule = self.params.step_rule
        if rule == "auto":
            rule = "polyak" if problem.target is not None else "geometric"
        if rule == "polyak" and problem.target is None:
            raise ValueError("the Polyak step needs f* = f(X*), i.e. a synthetic problem")
        return rule

    def init_kind(self, problem):
        return self.params.init or ("spectral" if self.rule(problem) == "polyak" else "small")

    def updater(self, start):
        import torch

        p, obj = self.params, start.obj
        loss = L1Loss(obj)
        if self.rule(obj.problem) == "polyak":
            f_star = loss.value(obj.target)

            def polyak(L, R, t):
                Z, f = loss.subgradient(L @ R.T)
                gl, gr = Z @ R, Z.T @ L
                sl, sr = scaled(gl, R), scaled(gr, L)
                denominator = float((gr * sr).sum() + (gl * sl).sum())
                if denominator <= 0 or f <= f_star:
                    return L, R
                eta = (f - f_star) / denominator
                return L - eta * sl, R - eta * sr

            return polyak

        def geometric(L, R, t):
            Z, _ = loss.subgradient(L @ R.T)
            norm = float(torch.linalg.norm(Z))
            if norm == 0:
                return L, R
            eta = p.step * p.decay**t / norm
            return L - eta * (Z @ R), R - eta * (Z.T @ L)

        return geometric


@hookimpl
def rankbench_register_factorizations(register):
    register(SubgradientL1)
