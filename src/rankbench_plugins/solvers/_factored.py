"""Shared machinery of the factored recovery solvers (``gd``, ``gd-sym``, ``scaledgd``, ``subgradient-l1``, ``altmin``).

* ``FactoredSolver``: their common ``solve``: the loss, the initialisation matrix, the initial factors, then
  ``iterate`` over the solver's update and ``finish``. A solver supplies only its own math through hooks: the
  starting factors (``init``, or just ``init_kind``), and for a gradient method the step size (``step_size``) and the
  step from Z = grad_X f (``update``), or else the whole iteration map (``updater``); optionally ``check`` and
  ``init_matrix``. A symmetric solver (X = F F^T) carries its factor as L = R = F.

* ``Objective``: the smooth least-squares loss of a ``RecoveryProblem`` on torch, its gradient with respect to the
  full matrix X (the factor gradients follow by the chain rule: grad_L = Z R, grad_R = Z^T L, or (Z + Z^T) X for
  X X^T), the back-projection, and the task's error measure evaluated from the factors.

      sensing     f(X) = 1/2 ||A vec(X) - y||^2                 Z = mat(A^T (A vec(X) - y))
      completion  f(X) = 1/(2p) ||P_Omega(X - Y)||_F^2          Z = P_Omega(X - Y) / p      (ratings: the same)
      robust      f(X) = 1/2 ||X + S - Y||_F^2, S = T(Y - X)     Z = X + S - Y
                  (Tong, Ma & Chi 2021, RPCA: T keeps the entries of the residual that are among the c(n2)
                  largest in magnitude of their row AND the c(n1) largest of their column. The paper keeps an
                  alpha-fraction (alpha-sparse S by assumption); our outliers have a Bernoulli(alpha) support, so
                  rows hold more than alpha n of them, and c(n) = ceil(alpha n + z sqrt(alpha (1 - alpha) n)) is the
                  expected count plus z binomial standard deviations, z = ``outlier_margin``)

* ``spectral_factors``: L = U_k S_k^{1/2}, R = V_k S_k^{1/2} from the top-k SVD of the initialisation matrix
  (A^*(y), Y/p, or Y - T(Y) for robust), zero-padded where k exceeds min(n1, n2).
* ``small_factor``: alpha * sqrt(sigma1 / n) * B with B i.i.d. N(0, 1), so ||factor||_op is about alpha times the
  scale sqrt(sigma1) of the true factors (sigma1 = top singular value of the initialisation matrix).
* ``iterate``: the error-curve loop: errors[0] is the error of the initialisation, then one entry per iteration; it
  stops when the error drops below ``tol``, after ``max_iters``, or when the error stops being finite. Per-iteration
  times (seconds since the solve started, error evaluation included) are returned with ``TimedSolveResult``.

Random numbers come from a CPU ``torch.Generator`` seeded with the cell seed and are then moved to the device, so a
seed gives the same initialisation on CPU and CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from rankbench.measure import synchronize
from rankbench.kinds.recovery import RecoveryProblem, RecoverySolver, SolveResult

DTYPE = torch.float64
MATRIX_PROBLEMS = frozenset({"sensing", "completion", "robust", "ratings"})


@dataclasses.dataclass
class TimedSolveResult(SolveResult):
    """A ``SolveResult`` that also carries ``times[i]``: seconds since the solve began when ``errors[i]`` was taken."""

    times: list[float] = dataclasses.field(default_factory=list)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def as_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=DTYPE, device=device)


def outlier_count(n: int, fraction: float, margin: float) -> int:
    """How many entries of a line of length n the thresholding keeps: n alpha + margin binomial standard deviations."""
    return min(n, max(1, math.ceil(n * fraction + margin * math.sqrt(n * fraction * (1.0 - fraction)))))


def outlier_estimate(residual: torch.Tensor, fraction: float, margin: float) -> torch.Tensor:
    """Tong-Ma-Chi's sparse estimate: keep entries among the largest of both their row and their column."""
    if fraction <= 0:
        return torch.zeros_like(residual)
    n1, n2 = residual.shape
    size = residual.abs()
    per_row = outlier_count(n2, fraction, margin)
    per_col = outlier_count(n1, fraction, margin)
    row_cut = size.topk(per_row, dim=1).values[:, -1:]
    col_cut = size.topk(per_col, dim=0).values[-1:, :]
    return torch.where((size >= row_cut) & (size >= col_cut), residual, torch.zeros_like(residual))


class Objective:
    """The least-squares loss of a matrix ``RecoveryProblem`` and the task's error measure, on ``device``."""

    def __init__(self, problem: RecoveryProblem, device: str, outlier_margin: float = 4.0):
        self.problem = problem
        self.kind = "ratings" if problem.target is None else problem.problem
        if self.kind not in MATRIX_PROBLEMS:
            raise ValueError(f"factored solvers handle {sorted(MATRIX_PROBLEMS)}, not {self.kind!r}")
        self.device = device
        self.shape = tuple(problem.shape)
        if self.kind == "sensing":
            self.A = as_tensor(problem.A, device)
            self.y = as_tensor(problem.y, device)
        else:
            self.Y = as_tensor(problem.observed, device)
        if problem.mask is not None:
            self.mask = torch.as_tensor(problem.mask, device=device).to(DTYPE)
            self.p = float(problem.observed_fraction)
        self.outlier_fraction = problem.outlier_fraction
        self.outlier_margin = outlier_margin
        if problem.target is not None:
            self.target = as_tensor(problem.target, device)
            self.target_norm = float(torch.linalg.norm(self.target))
        else:
            rows, cols = np.unravel_index(problem.holdout_index, self.shape)
            self.rows = torch.as_tensor(rows, device=device)
            self.cols = torch.as_tensor(cols, device=device)
            self.holdout = as_tensor(problem.holdout_values, device)

    # -- the loss -------------------------------------------------------------------------------------------------
    def gradient(self, X: torch.Tensor) -> torch.Tensor:
        """Z = grad_X f(X) (with the outlier estimate S re-computed at X for robust problems)."""
        if self.kind == "sensing":
            return (self.A.T @ (self.A @ X.reshape(-1) - self.y)).reshape(self.shape)
        if self.kind == "robust":
            residual = self.Y - X
            return self.outliers(residual) - residual
        return self.mask * (X - self.Y) / self.p

    def init_matrix(self) -> torch.Tensor:
        """The matrix whose top-k SVD is the spectral initialisation: A^*(y), Y/p, or Y - T(Y)."""
        if self.kind == "sensing":
            return (self.A.T @ self.y).reshape(self.shape)
        if self.kind == "robust":
            return self.Y - self.outliers(self.Y)
        return self.Y / self.p

    def outliers(self, residual: torch.Tensor) -> torch.Tensor:
        return outlier_estimate(residual, self.outlier_fraction, self.outlier_margin)

    # -- the error the task reports -------------------------------------------------------------------------------
    def error(self, L: torch.Tensor, R: torch.Tensor) -> float:
        """Relative Frobenius error of L R^T (synthetic) or held-out RMSE (ratings), as ``RecoveryProblem.error``."""
        if self.kind == "ratings":
            predicted = (L[self.rows] * R[self.cols]).sum(dim=1)
            return float(torch.sqrt(torch.mean((predicted - self.holdout) ** 2)))
        return float(torch.linalg.norm(L @ R.T - self.target) / self.target_norm)


def top_singular_value(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M, ord=2))


def spectral_factors(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L = U_k S_k^{1/2}, R = V_k S_k^{1/2} from the top-k SVD of M; zero columns beyond min(M.shape)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    q = min(k, S.numel())
    root = S[:q].sqrt()
    L = torch.zeros(M.shape[0], k, dtype=M.dtype, device=M.device)
    R = torch.zeros(M.shape[1], k, dtype=M.dtype, device=M.device)
    L[:, :q] = U[:, :q] * root
    R[:, :q] = Vh[:q].T * root
    return L, R


def symmetric_spectral_factor(M: torch.Tensor, k: int) -> torch.Tensor:
    """X = V_k diag(max(lambda_k, 0))^{1/2} from the top-k eigenpairs of (M + M^T) / 2."""
    values, vectors = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(values, descending=True)[: min(k, values.numel())]
    X = torch.zeros(M.shape[0], k, dtype=M.dtype, device=M.device)
    X[:, : order.numel()] = vectors[:, order] * values[order].clamp(min=0).sqrt()
    return X


def small_factor(n: int, k: int, scale: float, sigma1: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """scale * sqrt(sigma1 / n) * B, B i.i.d. N(0, 1) (drawn on CPU from ``gen``, then moved to ``device``)."""
    B = torch.randn(n, k, generator=gen, dtype=DTYPE)
    return (scale * math.sqrt(sigma1 / n) * B).to(device)


def scaled(G: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """G (F^T F)^{-1} (pseudo-inverse of the k x k Gram matrix)."""
    return G @ torch.linalg.pinv(F.T @ F, hermitian=True)


class Clock:
    """Seconds since the solve started, read after a device synchronisation."""

    def __init__(self, device: str):
        self.device = device
        synchronize(device)
        self.start = time.perf_counter()

    def __call__(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self.start


def iterate(
    step: Callable[[int], None], error: Callable[[], float], *, max_iters: int, tol: float, clock: Clock
) -> tuple[list[float], list[float], int, bool]:
    """Run ``step(t)`` for t = 0, 1, ... recording ``error()`` after each: (errors, times, iterations, converged)."""
    errors, times = [error()], [clock()]
    converged = errors[0] < tol
    iterations = 0
    while not converged and iterations < max_iters and math.isfinite(errors[-1]):
        step(iterations)
        iterations += 1
        errors.append(error())
        times.append(clock())
        converged = errors[-1] < tol
    return errors, times, iterations, converged


def finish(L: torch.Tensor, R: torch.Tensor, errors, times, iterations, converged) -> TimedSolveResult:
    """Package the factors' product and the curve; ``rank`` is the number of columns actually fitted."""
    return TimedSolveResult(
        estimate=(L @ R.T).cpu().numpy(),
        errors=errors,
        iterations=iterations,
        rank=int(L.shape[1]),
        converged=bool(converged),
        times=times,
    )


Factors = tuple[torch.Tensor, torch.Tensor]
Update = Callable[[torch.Tensor, torch.Tensor, int], Factors]


@dataclasses.dataclass
class Start:
    """What one solve's hooks see: the loss ``obj``, the initialisation matrix ``M``, the fitted rank ``k``."""

    obj: Objective
    M: torch.Tensor
    k: int
    seed: int
    device: str

    @functools.cached_property
    def sigma1(self) -> float:
        """The top singular value of ``M`` (computed once, when first asked for)."""
        return top_singular_value(self.M)

    def spectral(self) -> Factors:
        """L0 = U_k S_k^{1/2}, R0 = V_k S_k^{1/2} (``spectral_factors`` of M)."""
        return spectral_factors(self.M, self.k)

    def small(self, scale_L: float, scale_R: float) -> Factors:
        """L0 = scale_L sqrt(sigma1 / n1) B1, R0 = scale_R sqrt(sigma1 / n2) B2, B1 then B2 from the seed's generator."""
        gen = generator(self.seed)
        L = small_factor(self.M.shape[0], self.k, scale_L, self.sigma1, gen, self.device)
        R = small_factor(self.M.shape[1], self.k, scale_R, self.sigma1, gen, self.device)
        return L, R


class FactoredSolver(RecoverySolver):
    """A recovery solver that iterates on factors (L, R) of X = L R^T; subclasses supply the hooks below.

    ``solve`` starts the clock, builds the ``Objective``, fits k = rank x ``rank_multiplier`` columns from ``init``,
    applies the update from ``updater`` once per iteration and records ``Objective.error(L, R)`` after each
    (``iterate``); the result is ``finish``'s ``TimedSolveResult``.
    """

    def solve(self, problem, rank, *, seed, device, max_iters, tol):
        self.check(problem)
        clock = Clock(device)
        obj = self.objective(problem, device)
        start = Start(obj, self.init_matrix(obj), int(rank) * self.params.rank_multiplier, seed, device)
        factors = self.init(start)
        update = self.updater(start)

        def step(t):
            nonlocal factors
            factors = update(*factors, t)

        errors, times, iterations, converged = iterate(
            step, lambda: obj.error(*factors), max_iters=max_iters, tol=tol, clock=clock
        )
        return finish(*factors, errors, times, iterations, converged)

    # -- hooks ----------------------------------------------------------------------------------------------------
    def check(self, problem: RecoveryProblem) -> None:
        """Raise ``ValueError`` for a problem the solver cannot take (before the clock starts)."""

    def objective(self, problem: RecoveryProblem, device: str) -> Objective:
        """The loss; a solver with an ``outlier_margin`` parameter passes it on (the others keep the default)."""
        margin = getattr(self.params, "outlier_margin", None)
        return Objective(problem, device) if margin is None else Objective(problem, device, margin)

    def init_matrix(self, obj: Objective) -> torch.Tensor:
        """The matrix M the initialisation is taken from (default: ``Objective.init_matrix``)."""
        return obj.init_matrix()

    def init_kind(self, problem: RecoveryProblem) -> str:
        """``spectral`` or ``small`` (default: the ``init`` parameter)."""
        return self.params.init

    def init(self, start: Start) -> Factors:
        """The starting factors: ``Start.spectral`` or ``Start.small`` with ``init_scale`` for both factors."""
        if self.init_kind(start.obj.problem) == "spectral":
            return start.spectral()
        return start.small(self.params.init_scale, self.params.init_scale)

    def updater(self, start: Start) -> Update:
        """The map ``(L, R, t) -> (L', R')`` of iteration t. Default: a gradient step of the smooth loss,
        ``update(Z, L, R, eta)`` with Z = ``Objective.gradient(L R^T)`` and eta = ``step_size(start)`` (fixed per solve).
        """
        obj, eta = start.obj, self.step_size(start)

        def gradient_step(L, R, t):
            return self.update(obj.gradient(L @ R.T), L, R, eta)

        return gradient_step

    def step_size(self, start: Start) -> float:
        """eta of the default ``updater``."""
        raise NotImplementedError

    def update(self, Z: torch.Tensor, L: torch.Tensor, R: torch.Tensor, eta: float) -> Factors:
        """The default ``updater``'s step from (L, R), given Z = grad_X f(L R^T) and the step size."""
        raise NotImplementedError
