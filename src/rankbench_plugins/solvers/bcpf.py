"""BCPF: Bayesian CP factorisation with automatic rank determination, as a recovery solver.

Paper: Q. Zhao, L. Zhang and A. Cichocki, "Bayesian CP Factorization of Incomplete Tensors with Automatic Rank
Determination", IEEE TPAMI 37(9):1751-1763, 2015 (arXiv:1401.6497). The model (B1-B3), the variational updates
(B4)-(B8), the lower bound (B9), the pruning and stopping rules and every deliberate difference from the author's
MATLAB ``BCPF_TC.m`` are written out in ``rankbench.kinds.bcpf_core``, whose ``bcpf`` function this solver runs on
the observed entries, starting from the selector's rank (which ARD only lowers: give it an over-estimate; the
``ard`` selector and ``bcpf`` itself default to ``bcpf_core.default_max_rank``: max of the dimensions, min for a
matrix).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.bcpf_core import bcpf
from rankbench.kinds.recovery import RecoveryProblem, RecoverySolver, SolveResult

class BCPFSolver(RecoverySolver):
    name: ClassVar[str] = "bcpf"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = (
        "Bayesian CP factorisation with ARD (Zhao, Zhang & Cichocki, TPAMI 2015): variational Bayes on the observed "
        "entries; starts from the selector's rank and prunes components, so it reports the rank it ends with."
    )
    problems: ClassVar[frozenset[str]] = frozenset({"completion", "tensor-completion", "ratings"})

    class Params(PluginParams):
        prune_tol: float = Field(1e-9, gt=0.0, lt=1.0, description="relative power below which a component is dropped")
        lambda_tol: float = Field(1e-3, gt=0.0, description="stop only when E[lambda] changes less than this")
        init: Literal["svd", "random"] = "svd"
        rebalance: bool = Field(True, description="exact scale-rebalancing step (False: plain BCPF)")

    def solve(
        self, problem: RecoveryProblem, rank: int, *, seed: int, device: str, max_iters: int, tol: float
    ) -> SolveResult:
        """Run BCPF from ``max_rank = rank`` on the observed entries; stop on the lower-bound criterion with ``tol``
        (or, as every solver, once ``problem.error`` < ``tol``), or after ``max_iters`` sweeps."""
        if problem.observed is None:
            raise ValueError(f"bcpf needs observed entries (problem type {problem.problem!r})")
        errors: list[float] = []

        def record(t: int, estimate: np.ndarray) -> bool:
            errors.append(problem.error(estimate))
            return errors[-1] < tol

        result = bcpf(
            problem.observed,
            problem.mask,
            max_rank=max(1, int(rank)),
            max_iters=max_iters,
            tol=tol,
            prune_tol=self.params.prune_tol,
            lambda_tol=self.params.lambda_tol,
            init=self.params.init,
            rebalance=self.params.rebalance,
            seed=seed,
            device=device,
            callback=record,
        )
        return SolveResult(
            estimate=result.estimate,
            errors=errors,
            iterations=result.iterations,
            rank=result.rank,
            converged=result.converged,
        )


@hookimpl
def rankbench_register_factorizations(register):
    register(BCPFSolver)
