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

* Completion and ratings on the observed entries (``Objective.observed_gradient``, used by ``gd`` and ``scaledgd``):
  Z = P_Omega(L R^T - Y) / p is formed at the |Omega| observed entries only (the row-wise dot products of L and R
  there) as a sparse CSR matrix with a CSR copy of its transpose, so Z R and Z^T L cost O(|Omega| k) instead of
  O(n1 n2 k), and the spectral initialisation takes the top singular triplets of Y / p by ARPACK on its nonzeros;
  the iterates equal the dense computation's to rounding (tested). Both from ``SPARSE_FROM`` entries on. The per-iteration error against a
  low-rank target is taken in factored form (``Objective.error``): with X* = U_t S_t V_t^T (its SVD at numerical
  rank, once per solve), ||L R^T - X*||_F = ||R_A R_B^T||_F for the QR factors of A = [L, -U_t S_t] and
  B = [R, V_t] -- O((n1 + n2)(k + r)^2), no n1 x n2 matrix, and no cancellation (nothing is squared).

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
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from rankbench.measure import synchronize
from rankbench.kinds.recovery import RecoveryProblem, RecoverySolver, SolveResult

if TYPE_CHECKING:
    import torch

MATRIX_PROBLEMS = frozenset({"sensing", "completion", "robust", "ratings"})
# matrices from this many entries take the sparse routes (observed-entry gradients, ARPACK for the top singular
# triplets): below it the dense routes are as fast (measured: 100 x 80 and 200 x 160 completion)
SPARSE_FROM = 1 << 16


@dataclasses.dataclass
class TimedSolveResult(SolveResult):
    """A ``SolveResult`` that also carries ``times[i]``: seconds since the solve began when ``errors[i]`` was taken."""

    times: list[float] = dataclasses.field(default_factory=list)


def default_dtype() -> torch.dtype:
    """The solvers' dtype, ``torch.float64`` (a function, so that importing this module does not import torch; the
    module attribute ``DTYPE`` still gives it)."""
    import torch

    return torch.float64


def __getattr__(name: str):
    if name == "DTYPE":
        return default_dtype()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(int(seed))


def as_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(array), dtype=default_dtype(), device=device)


def outlier_count(n: int, fraction: float, margin: float) -> int:
    """How many entries of a line of length n the thresholding keeps: n alpha + margin binomial standard deviations."""
    return min(n, max(1, math.ceil(n * fraction + margin * math.sqrt(n * fraction * (1.0 - fraction)))))


def outlier_estimate(residual: torch.Tensor, fraction: float, margin: float) -> torch.Tensor:
    """Tong-Ma-Chi's sparse estimate: keep entries among the largest of both their row and their column."""
    import torch

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
        import torch

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
            self.mask = torch.as_tensor(problem.mask, device=device).to(default_dtype())
            self.p = float(problem.observed_fraction)
        self.outlier_fraction = problem.outlier_fraction
        self.outlier_margin = outlier_margin
        if problem.mask is not None and self.kind in ("completion", "ratings"):
            self._index_observed()
        self.target_factors = None
        if problem.target is not None:
            self.target = as_tensor(problem.target, device)
            self.target_norm = float(torch.linalg.norm(self.target))
            if self.target.numel() >= SPARSE_FROM:  # below, the dense norm is cheaper than the two QRs
                self.target_factors = low_rank_factors(self.target, problem.true_rank)
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

    def _index_observed(self) -> None:
        """The observed entries in row-major (CSR) and column-major (CSR of the transpose) order."""
        import torch

        rows, cols = torch.nonzero(self.mask, as_tuple=True)  # row-major
        self.obs_rows, self.obs_cols = rows, cols
        self.obs_values = self.Y[rows, cols]
        n1, n2 = self.shape
        self.crow = torch.zeros(n1 + 1, dtype=torch.int64, device=self.device)
        self.crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n1), 0)
        self.by_col = torch.argsort(cols * n1 + rows)  # column-major order of the same entries
        self.ccol = torch.zeros(n2 + 1, dtype=torch.int64, device=self.device)
        self.ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=n2), 0)

    def observed_gradient(self, L: torch.Tensor, R: torch.Tensor) -> MaskedGradient:
        """Z = P_Omega(L R^T - Y) / p for completion and ratings, formed at the observed entries only."""
        import torch

        # row-wise dot products as a matrix-vector product (torch's sum over a short last axis is ~10x slower)
        ones = torch.ones(L.shape[1], dtype=L.dtype, device=L.device)
        values = ((L[self.obs_rows] * R[self.obs_cols]) @ ones - self.obs_values) / self.p
        n1, n2 = self.shape
        with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"; the products used here are exact
            warnings.simplefilter("ignore", UserWarning)
            Z = torch.sparse_csr_tensor(self.crow, self.obs_cols, values, (n1, n2))
            Zt = torch.sparse_csr_tensor(self.ccol, self.obs_rows[self.by_col], values[self.by_col], (n2, n1))
        return MaskedGradient(Z, Zt)

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
        import torch

        if self.kind == "ratings":
            predicted = (L[self.rows] * R[self.cols]).sum(dim=1)
            return float(torch.sqrt(torch.mean((predicted - self.holdout) ** 2)))
        if self.target_factors is not None:
            U, V = self.target_factors
            _, RA = torch.linalg.qr(torch.cat([L, -U], dim=1))
            _, RB = torch.linalg.qr(torch.cat([R, V], dim=1))
            return float(torch.linalg.norm(RA @ RB.T) / self.target_norm)
        return float(torch.linalg.norm(L @ R.T - self.target) / self.target_norm)


class MaskedGradient:
    """Z = P_Omega(...) as a sparse CSR matrix and its transpose (also CSR): ``Z @ M`` and ``Z.T @ M``."""

    def __init__(self, Z: torch.Tensor, Zt: torch.Tensor):
        self.Z, self.Zt = Z, Zt

    def __matmul__(self, M: torch.Tensor) -> torch.Tensor:
        return self.Z @ M

    @property
    def T(self) -> MaskedGradient:
        return MaskedGradient(self.Zt, self.Z)

    def to_dense(self) -> torch.Tensor:
        return self.Z.to_dense()


def low_rank_factors(T: torch.Tensor, rank: int | None, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U_t S_t, V_t) with T = (U_t S_t) V_t^T at the planted ``rank``, when that rank is at most half of
    min(T.shape) and the factors reproduce T to ``rtol`` relative; else None (the error is then taken on the dense
    matrix)."""
    import torch

    if rank is None or rank < 1 or rank > min(T.shape) // 2:
        return None
    U, s, Vh = top_singular_triplets(T, rank, arpack=T.numel() >= SPARSE_FROM and T.device.type == "cpu")
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    US, V = U[:, :rank] * s[:rank], Vh[:rank].T
    if float(torch.linalg.norm(US @ V.T - T)) > rtol * 10 * float(torch.linalg.norm(T)):
        return None
    return US, V


def top_singular_triplets(M: torch.Tensor, k: int,
                          arpack: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest singular triplets (U_k, s_k, V_k^T) of M, descending. ``arpack`` None: a mostly-zero CPU matrix
    of at least ``SPARSE_FROM`` entries (completion's Y / p) goes to ARPACK on its nonzeros, so the cost follows the
    observations instead of n1 n2 min(n1, n2), anything else to the dense SVD; True: ARPACK on the dense matrix
    (matrix-vector products only; a planted low-rank target). ARPACK runs ``scipy.sparse.linalg.svds`` at tolerance
    0 (machine precision) from a fixed start vector."""
    import torch

    n = min(M.shape)
    usable = M.device.type == "cpu" and 0 < k < n - 1
    if arpack is None:
        arpack = usable and M.numel() >= SPARSE_FROM and int(torch.count_nonzero(M)) < 0.5 * M.numel()
        operator = "sparse"
    else:
        arpack = arpack and usable
        operator = "dense"
    if not arpack:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import svds

    matrix = csr_matrix(M.numpy()) if operator == "sparse" else M.numpy()
    U, s, Vh = svds(matrix, k=k, tol=0, v0=np.ones(n) / np.sqrt(n))
    order = np.argsort(s)[::-1]
    return (torch.from_numpy(np.ascontiguousarray(U[:, order])), torch.from_numpy(s[order].copy()),
            torch.from_numpy(np.ascontiguousarray(Vh[order])))


def spectral_factors(triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor], shape: tuple[int, int],
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L = U_k S_k^{1/2}, R = V_k S_k^{1/2} from M's top singular ``triplets``; zero columns beyond min(M.shape)."""
    import torch

    U, S, Vh = triplets
    q = min(k, S.numel())
    root = S[:q].sqrt()
    L = torch.zeros(shape[0], k, dtype=U.dtype, device=U.device)
    R = torch.zeros(shape[1], k, dtype=U.dtype, device=U.device)
    L[:, :q] = U[:, :q] * root
    R[:, :q] = Vh[:q].T * root
    return L, R


def symmetric_spectral_factor(M: torch.Tensor, k: int) -> torch.Tensor:
    """X = V_k diag(max(lambda_k, 0))^{1/2} from the top-k eigenpairs of (M + M^T) / 2."""
    import torch

    values, vectors = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(values, descending=True)[: min(k, values.numel())]
    X = torch.zeros(M.shape[0], k, dtype=M.dtype, device=M.device)
    X[:, : order.numel()] = vectors[:, order] * values[order].clamp(min=0).sqrt()
    return X


def small_factor(n: int, k: int, scale: float, sigma1: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """scale * sqrt(sigma1 / n) * B, B i.i.d. N(0, 1) (drawn on CPU from ``gen``, then moved to ``device``)."""
    import torch

    B = torch.randn(n, k, generator=gen, dtype=default_dtype())
    return (scale * math.sqrt(sigma1 / n) * B).to(device)


def scaled(G: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """G (F^T F)^{-1}: the inverse of the k x k Gram matrix where it exists, its pseudo-inverse otherwise (zero or
    dependent columns). One ``inv_ex`` instead of always the pseudo-inverse's eigendecomposition, which cost ~10 % of
    a small ScaledGD iteration."""
    import torch

    gram = F.T @ F
    inverse, info = torch.linalg.inv_ex(gram)
    if int(info) == 0:
        return G @ inverse
    return G @ torch.linalg.pinv(gram, hermitian=True)


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


Factors = tuple["torch.Tensor", "torch.Tensor"]
Update = Callable[["torch.Tensor", "torch.Tensor", int], Factors]


@dataclasses.dataclass
class Start:
    """What one solve's hooks see: the loss ``obj``, the initialisation matrix ``M``, the fitted rank ``k``."""

    obj: Objective
    M: torch.Tensor
    k: int
    seed: int
    device: str

    @functools.cached_property
    def triplets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M's top min(k, min(M.shape)) singular triplets, computed once: the spectral start and sigma1 share them."""
        return top_singular_triplets(self.M, min(self.k, min(self.M.shape)))

    @property
    def sigma1(self) -> float:
        """The top singular value of ``M``."""
        return float(self.triplets[1][0])

    def spectral(self) -> Factors:
        """L0 = U_k S_k^{1/2}, R0 = V_k S_k^{1/2} (``spectral_factors`` of M's triplets)."""
        return spectral_factors(self.triplets, tuple(self.M.shape), self.k)

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

    # whether ``update`` only needs Z @ R and Z.T @ L, so completion can hand it Z at the observed entries
    observed_entries: ClassVar[bool] = False

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
        if self.observed_entries and obj.kind in ("completion", "ratings") and obj.Y.numel() >= SPARSE_FROM:

            def observed_step(L, R, t):
                return self.update(obj.observed_gradient(L, R), L, R, eta)

            return observed_step

        def gradient_step(L, R, t):
            return self.update(obj.gradient(L @ R.T), L, R, eta)

        return gradient_step

    def step_size(self, start: Start) -> float:
        """eta of the default ``updater``."""
        raise NotImplementedError

    def update(self, Z: torch.Tensor, L: torch.Tensor, R: torch.Tensor, eta: float) -> Factors:
        """The default ``updater``'s step from (L, R), given Z = grad_X f(L R^T) and the step size."""
        raise NotImplementedError
