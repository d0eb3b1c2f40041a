"""The ``recovery`` problem kind: how the ``matrix-recovery`` task talks to its solvers.

A solver is a factorization plugin whose ``problem_kinds`` contain ``recovery``. The task generates (or loads) one
``RecoveryProblem`` per task configuration and seed, asks the selector for a rank from the problem's ``site()``, and
hands problem and rank to ``RecoverySolver.solve``. Solvers work in float64 torch tensors on ``device`` and report
the task's error measure after every iteration, so every curve in the report is the same quantity.

Problem types (``RecoveryProblem.problem``):

``sensing``            y_k = <A_k, X*> + noise, A_k with i.i.d. N(0, 1/m) entries (stored as ``A``: m x (n1*n2)).
``completion``         Y = P_Omega(X* + noise), Omega uniform with probability p (``mask``).
``robust``             Y = X* + S + noise with S sparse gross outliers on a fraction of entries (fully observed).
``tensor-completion``  Y = P_Omega(T* + noise) for a 3-way CP tensor T* of rank r.
``ratings``            a real rating matrix (MovieLens-100k): ``mask`` marks the training ratings, the metric is RMSE
                       on held-out ratings (``holdout_index``, ``holdout_values``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import numpy as np

from rankbench.api import RANK_CAP, RECOVERY, CellFailure, Diverged, Factorization, RankProblem, Selector, Site, Task
from rankbench.kinds.protocol import Protocol

BLOWUP = 1e6  # a final error above BLOWUP x the initial error counts as divergence


@dataclasses.dataclass
class RecoveryProblem:
    problem: str
    shape: tuple[int, ...]
    target: np.ndarray | None = None  # X* (None for real data)
    true_rank: int | None = None
    psd: bool = False  # X* = U U^T (symmetric PSD); solvers of X X^T form need this
    noise_std: float = 0.0  # absolute per-entry (per-measurement) noise std
    # sensing
    A: np.ndarray | None = None
    y: np.ndarray | None = None
    # completion / robust / tensor / ratings
    observed: np.ndarray | None = None  # zeros where not observed
    mask: np.ndarray | None = None  # bool, True where observed
    outlier_fraction: float = 0.0
    # ratings: held-out entries (flat indices into the matrix) and their values
    holdout_index: np.ndarray | None = None
    holdout_values: np.ndarray | None = None

    @property
    def observed_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask is not None else 1.0

    def backprojection(self) -> np.ndarray:
        """The full-rank estimate with no rank model: A*(y), Y/p, or Y. Selectors look at its spectrum."""
        if self.problem == "sensing":
            return (self.A.T @ self.y).reshape(self.shape)
        if self.mask is not None:
            return self.observed / self.observed_fraction
        return self.observed

    def error(self, estimate: np.ndarray) -> float:
        """Relative Frobenius error against X* for synthetic problems; held-out RMSE for real ratings."""
        estimate = np.asarray(estimate, dtype=np.float64)
        if self.target is not None:
            return float(np.linalg.norm(estimate - self.target) / np.linalg.norm(self.target))
        predicted = estimate.reshape(-1)[self.holdout_index]
        return float(np.sqrt(np.mean((predicted - self.holdout_values) ** 2)))

    @property
    def error_name(self) -> str:
        return "rel_error" if self.target is not None else "rmse"

    def site(self) -> Site:
        """The single site a selector sees: spectrum of the back-projection (per mode for tensors), plus data."""
        back = self.backprojection()
        if back.ndim == 2:
            return Site(
                name="X",
                shape=back.shape,
                singular_values=np.linalg.svd(back, compute_uv=False),
                noise_sigma=None,
                data=self.observed if self.observed is not None else back,
                mask=self.mask,
            )
        spectra = [
            np.linalg.svd(np.moveaxis(back, mode, 0).reshape(back.shape[mode], -1), compute_uv=False)
            for mode in range(back.ndim)
        ]
        cp_params = sum(back.shape)
        return Site(
            name="X",
            shape=back.shape,
            mode_singular_values=spectra,
            params_at_rank=lambda k: int(k) * cp_params,
            max_rank=int(min(back.shape)),
            data=self.observed,
            mask=self.mask,
        )


@dataclasses.dataclass
class SolveResult:
    estimate: np.ndarray
    errors: list[float]  # problem.error after each iteration (index 0 = the initialisation)
    iterations: int
    rank: int | None = None  # the rank the solver ended with, when it determines it itself (bcpf)
    converged: bool = False


class RecoverySolver(Factorization):
    """Base for recovery solvers (the factorization axis of ``matrix-recovery``)."""

    problem_kinds: ClassVar[frozenset[str]] = frozenset({RECOVERY})
    problems: ClassVar[frozenset[str]] = frozenset()  # which ``RecoveryProblem.problem`` types it can solve

    def skip(self, task, selector) -> str | None:
        problem = getattr(task.params, "problem", None)
        if getattr(task.params, "data", None):
            problem = "ratings"
        if problem is not None and problem not in self.problems:
            return (
                f"solver {self.name} does not solve {problem} problems (it solves: {', '.join(sorted(self.problems))})"
            )
        return None

    @abc.abstractmethod
    def solve(
        self, problem: RecoveryProblem, rank: int, *, seed: int, device: str, max_iters: int, tol: float
    ) -> SolveResult:
        """Fit a rank-``rank`` model to ``problem``; stop when ``problem.error`` < ``tol`` or after ``max_iters``."""

    def params_at_rank(self, shape: tuple[int, ...], rank: int) -> int:
        return int(rank) * int(sum(shape))


class RecoveryTask(Task):
    """What a task of the recovery kind supplies: one problem instance per task configuration and seed, and the
    solvers' iteration budget. ``run_recovery`` / ``run_recovery_reference`` are the protocol."""

    problem_kind: ClassVar[str] = RECOVERY
    budget_kind: ClassVar[str | None] = RANK_CAP

    @abc.abstractmethod
    def recovery_instance(self, ctx) -> tuple[RecoveryProblem, Site]:
        """The problem of ``ctx.task_seed`` and the site a selector sees (memoised: every method sees the same)."""

    @abc.abstractmethod
    def solve_settings(self) -> tuple[int, float]:
        """(max_iters, tol): every solver stops when the task's error is below ``tol`` or after ``max_iters``."""


def recovery_setup(task: RecoveryTask, ctx) -> None:
    task.recovery_instance(ctx)


def run_recovery_reference(task: RecoveryTask, ctx) -> None:
    """The back-projection with no rank model (A*(y), Y/p or Y), measured like a solver's estimate."""
    problem, _ = task.recovery_instance(ctx)
    with ctx.phase("solve"):
        error = problem.error(problem.backprojection())
    entries = int(np.prod(problem.shape))
    ctx.metric(problem.error_name, error, "", False)
    ctx.record_size(entries, entries)


def run_recovery(task: RecoveryTask, ctx, selector: Selector, solver: RecoverySolver) -> None:
    """One recovery cell: the selector picks a rank from the site's spectrum, the solver fits it; the error after
    every iteration is the curve, and convergence (first iteration below ``tol``) is recorded with its time."""
    problem, site = task.recovery_instance(ctx)
    max_iters, tol = task.solve_settings()
    with ctx.phase("select"):
        ranks = selector.select(RankProblem([site], ctx.budget, ctx.budget_kind, ctx.seed, device=ctx.device))
    if site.name not in ranks:
        raise CellFailure(f"selector {selector.name} gave no rank for site {site.name!r} (got {sorted(ranks)})")
    chosen = ranks[site.name]
    rank = int(max(chosen)) if isinstance(chosen, (tuple, list)) else int(chosen)
    if rank < 1:
        raise CellFailure(f"selector {selector.name} chose rank {chosen} for site {site.name}; solvers need >= 1")

    with ctx.phase("solve"):
        result = solver.solve(problem, rank, seed=ctx.seed, device=ctx.device, max_iters=max_iters, tol=tol)
    solve_s = ctx.timer.seconds.get("solve", float("nan"))

    errors = [float(e) for e in result.errors]
    name = problem.error_name
    ctx.curve(name, errors)
    first = errors[0] if errors else float("nan")
    final = errors[-1] if errors else problem.error(result.estimate)
    if not math.isfinite(final) or (math.isfinite(first) and final > BLOWUP * max(first, 1e-300)):
        raise Diverged(f"{solver.name} at rank {rank}: {name} went from {first:.3g} at the start to {final:.3g}")

    final_rank = result.rank if result.rank is not None else chosen
    scalar_rank = int(max(final_rank)) if isinstance(final_rank, (tuple, list)) else int(final_rank)
    params = solver.params_at_rank(problem.shape, scalar_rank)
    entries = int(np.prod(problem.shape))

    ctx.metric(name, final, "", False)
    ctx.metric("rank_selected", scalar_rank, "", None)
    if problem.true_rank is not None:
        ctx.metric("rank_true", problem.true_rank, "", None)
    ctx.metric("iterations", result.iterations, "", None)
    hit = next((i for i, e in enumerate(errors) if e < tol), None)
    ctx.metric("converged", 1.0 if hit is not None else 0.0, "", True)
    if hit is not None:
        times = getattr(result, "times", None)
        if times is not None and len(times) == len(errors):
            to_tol = float(times[hit])
        else:
            to_tol = solve_s * hit / max(result.iterations, 1)
        ctx.metric("iterations_to_tol", hit, "", False)
        ctx.metric("seconds_to_tol", to_tol, "s", False)
    ctx.record_size(params, entries)
    ctx.ranks(site.name, final_rank if isinstance(final_rank, (tuple, list)) else scalar_rank, params)


def recovery_skip(task: RecoveryTask, selector: Selector, factorization: Factorization) -> str | None:
    if not isinstance(factorization, RecoverySolver):
        return f"factorization {factorization.name} is not a recovery solver"
    return None


PROTOCOL = Protocol(
    RECOVERY, RecoveryTask, run=run_recovery, reference=run_recovery_reference, skip=recovery_skip,
    setup=recovery_setup,
)
