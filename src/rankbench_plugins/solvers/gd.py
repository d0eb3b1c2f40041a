"""Solver ``gd``: plain gradient descent on an asymmetric factorisation X = L R^T.

Two papers, two initialisations:

* Tong, Ma & Chi, "Accelerating ill-conditioned low-rank matrix estimation via scaled gradient descent" (JMLR 2021),
  their GD baseline: spectral initialisation L0 = U S^{1/2}, R0 = V S^{1/2} from the top-k SVD of A^*(y), Y/p, or
  Y - T(Y) (robust), and

      L <- L - (eta / sigma1) grad_L f = L - (eta / sigma1) Z R
      R <- R - (eta / sigma1) grad_R f = R - (eta / sigma1) Z^T L        (simultaneous; Z = grad_X f(L R^T))

  with sigma1 the top singular value of the spectral initialisation (``init: spectral``, the default).
* Xiong, Ding & Du, "How over-parameterization slows down gradient descent in matrix sensing" (ICLR 2024), the
  asymmetric over-parameterised case: the same update from a small random initialisation L0 = alpha
  sqrt(sigma1 / n1) B1, R0 = beta alpha sqrt(sigma1 / n2) B2 (``init: small``, alpha = ``init_scale``,
  beta = ``init_imbalance``), fitting k = rank x ``rank_multiplier`` columns; the paper proves a linear rate
  exp(-Omega(alpha^2 T)) for k > r and stresses that the imbalance between the factors drives it. With beta = 1 the
  imbalance L^T L - R^T R is a difference of two nearly equal Wishart matrices and the rate varies a lot from seed
  to seed; beta = 1/3 (our default, an unverified reading of the paper's setup) makes it reliable.

The losses f per problem type (sensing, completion, robust via Tong-Ma-Chi's outlier thresholding, ratings as
completion) are in ``_factored.Objective``.

On MovieLens ratings the observations are far from uniform (some rows and columns are 10x denser than p), so the
default step diverges there; ``step: 0.05`` converges (measured RMSE after 200 iterations at rank 3: GD 1.07,
ScaledGD 0.94).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench_plugins.solvers._factored import FactoredSolver


class GD(FactoredSolver):
    name = "gd"
    version = "1"
    description = "Gradient descent on L R^T (spectral init as Tong-Ma-Chi's baseline, or small init as Xiong-Ding-Du)"
    problems = frozenset({"sensing", "completion", "robust", "ratings"})
    observed_entries = True  # completion: Z at the observed entries only (_factored)

    class Params(PluginParams):
        step: float = Field(0.5, gt=0, description="eta; the step is eta / sigma1 of the initialisation matrix")
        init: Literal["spectral", "small"] = "spectral"
        init_scale: float = Field(0.5, gt=0, description="alpha of the small init (factor norm / true factor norm)")
        init_imbalance: float = Field(1 / 3, gt=0, description="small init: R0 is scaled by this factor relative to L0")
        rank_multiplier: int = Field(1, ge=1, description="fit rank x rank_multiplier columns (over-parameterisation)")
        outlier_margin: float = Field(4.0, ge=0, description="robust: z of the outlier threshold (see _factored)")

    def init(self, start):
        p = self.params
        if p.init == "small":
            return start.small(p.init_scale, p.init_scale * p.init_imbalance)
        return start.spectral()

    def step_size(self, start):
        return self.params.step / start.sigma1

    def update(self, Z, L, R, eta):
        return L - eta * (Z @ R), R - eta * (Z.T @ L)


@hookimpl
def rankbench_register_factorizations(register):
    register(GD)
