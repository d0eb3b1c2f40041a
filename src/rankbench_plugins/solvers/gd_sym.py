"""Solver ``gd-sym``: gradient descent on a symmetric factorisation X = F F^T of a PSD target.

Xiong, Ding & Du, "How over-parameterization slows down gradient descent in matrix sensing" (ICLR 2024), the
symmetric case: F in R^{n x k} from a small random initialisation F0 = alpha sqrt(sigma1 / n) B (B i.i.d. N(0, 1),
alpha = ``init_scale``), and

    F <- F - (eta / sigma1) grad_F f(F F^T) = F - (eta / sigma1) (Z + Z^T) F        (Z = grad_X f at X = F F^T)

with sigma1 the top singular value of the initialisation matrix (A^*(y) or Y/p). With k = r the paper proves a
linear rate; with k > r (``rank_multiplier`` > 1) randomly initialised GD has an Omega(1/T^2) lower bound, i.e. it
converges sublinearly. ``init: spectral`` starts instead from the top-k eigenpairs of the symmetrised
initialisation matrix. Problems: sensing and completion with ``psd: true``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench_plugins.solvers._factored import (
    FactoredSolver,
    generator,
    small_factor,
    symmetric_spectral_factor,
)


class GDSym(FactoredSolver):
    name = "gd-sym"
    version = "1"
    description = "Gradient descent on F F^T for PSD targets, small random init (Xiong-Ding-Du symmetric case)"
    problems = frozenset({"sensing", "completion"})

    class Params(PluginParams):
        step: float = Field(0.25, gt=0, description="eta; the step is eta / sigma1 of the initialisation matrix")
        init: Literal["spectral", "small"] = "small"
        init_scale: float = Field(0.5, gt=0, description="alpha of the small init (factor norm / true factor norm)")
        rank_multiplier: int = Field(1, ge=1, description="fit rank x rank_multiplier columns (over-parameterisation)")

    def skip(self, task, selector):
        reason = super().skip(task, selector)
        if reason is None and not getattr(task.params, "psd", False):
            return "gd-sym fits F F^T and needs a PSD target (psd: true)"
        return reason

    def check(self, problem):
        if not problem.psd:
            raise ValueError("gd-sym needs a PSD problem (psd: true)")

    def init(self, start):
        # the factor pair is (F, F): X = F F^T
        if self.params.init == "spectral":
            F = symmetric_spectral_factor(start.M, start.k)
        else:
            F = small_factor(
                start.M.shape[0], start.k, self.params.init_scale, start.sigma1, generator(start.seed), start.device
            )
        return F, F

    def step_size(self, start):
        return self.params.step / start.sigma1

    def update(self, Z, F, _, eta):
        F = F - eta * ((Z + Z.T) @ F)
        return F, F

    def params_at_rank(self, shape, rank):
        return int(rank) * int(shape[0])


@hookimpl
def rankbench_register_factorizations(register):
    register(GDSym)
