"""Solver ``scaledgd``: scaled gradient descent (Tong, Ma & Chi, "Accelerating ill-conditioned low-rank matrix
estimation via scaled gradient descent", JMLR 2021).

Spectral initialisation L0 = U_k S_k^{1/2}, R0 = V_k S_k^{1/2} from the top-k SVD of A^*(y) (sensing), Y/p
(completion and ratings), or Y - T(Y) (robust PCA: outliers removed by the row-and-column thresholding T first), then

    L <- L - eta grad_L f (R^T R)^{-1} = L - eta Z R (R^T R)^{-1}
    R <- R - eta grad_R f (L^T L)^{-1} = R - eta Z^T L (L^T L)^{-1}           (simultaneous; eta = 0.5)

with Z = grad_X f(L R^T) from ``_factored.Objective`` (for robust PCA Z = L R^T + S - Y with S = T(Y - L R^T)
re-estimated every iteration). The k x k inverses are pseudo-inverses, so zero columns (k > min(n1, n2), or
``init: small`` starting points that are rank-deficient) stay harmless. ``init: small`` is offered for comparison
with ``gd`` (it is not the paper's method).

On MovieLens ratings the observations are far from uniform (some rows and columns are 10x denser than p), so the
default step diverges there; ``step: 0.05`` converges (measured RMSE after 200 iterations at rank 3: GD 1.07,
ScaledGD 0.94).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench_plugins.solvers._factored import FactoredSolver, scaled


class ScaledGD(FactoredSolver):
    name = "scaledgd"
    version = "1"
    description = "Scaled gradient descent on L R^T with spectral init (Tong-Ma-Chi 2021)"
    problems = frozenset({"sensing", "completion", "robust", "ratings"})
    observed_entries = True  # completion: Z at the observed entries only (_factored)

    class Params(PluginParams):
        step: float = Field(0.5, gt=0, description="eta")
        init: Literal["spectral", "small"] = "spectral"
        init_scale: float = Field(0.1, gt=0, description="alpha of the small init (factor norm / true factor norm)")
        rank_multiplier: int = Field(1, ge=1, description="fit rank x rank_multiplier columns (over-parameterisation)")
        outlier_margin: float = Field(4.0, ge=0, description="robust: z of the outlier threshold (see _factored)")

    def step_size(self, start):
        return self.params.step

    def update(self, Z, L, R, eta):
        return L - eta * scaled(Z @ R, R), R - eta * scaled(Z.T @ L, L)


@hookimpl
def rankbench_register_factorizations(register):
    register(ScaledGD)
