"""pytest-benchmark: per-iteration cost of the recovery solvers, each against a named reference in the same run.

* ``scaledgd-vs-numpy``: 50 ScaledGD iterations on a sensing problem (n = 40, r = 3, m = 5 r (2n - r) measurements)
  through the plugin (torch, float64, error evaluated each iteration), against the same update and error written in
  plain NumPy. The two produce the same iterates (checked), so the ratio is pure implementation overhead.
* ``gd-completion-vs-numpy``: 50 GD iterations on an 800 x 640 rank-3 completion problem with 10 % observed
  entries through the plugin (the gradient formed at the observed entries, ARPACK's top singular triplets for the
  spectral start, the error in factored form), against the same update in plain NumPy on dense matrices (dense
  masked gradient, dense SVD, dense error). Same iterates (checked); the ratio is what working on the observations
  saves.
* ``solvers``: 50 iterations of every solver on a problem it supports, for regression tracking.

Run: ``make benchmark`` (``pytest benchmarks/pytest --benchmark-only``). Ratios are in ``extra_info`` and in the
group table's relative columns.
"""

import numpy as np
import pytest

from rankbench.context import CellContext
from rankbench_plugins.tasks.matrix_recovery import MatrixRecovery

ITERS = 50


def make_problem(tmp_path, **params):
    task = MatrixRecovery(MatrixRecovery.Params(**params))
    ctx = CellContext(cell_id="bench", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None,
                      shared={}, cache_dir=tmp_path)
    task.setup(ctx)
    return task.recovery_instance(ctx)[0]


def numpy_scaledgd(problem, rank, iters, eta=0.5):
    """ScaledGD for sensing in plain NumPy: the reference implementation of the same update (Tong, Ma, Chi 2021)."""
    A, y, shape, target = problem.A, problem.y, problem.shape, problem.target
    M = (A.T @ y).reshape(shape)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    L, R = U[:, :rank] * np.sqrt(s[:rank]), Vt[:rank].T * np.sqrt(s[:rank])
    norm = np.linalg.norm(target)
    errors = [np.linalg.norm(L @ R.T - target) / norm]
    for _ in range(iters):
        Z = (A.T @ (A @ (L @ R.T).ravel() - y)).reshape(shape)
        L, R = L - eta * Z @ R @ np.linalg.inv(R.T @ R), R - eta * Z.T @ L @ np.linalg.inv(L.T @ L)
        errors.append(np.linalg.norm(L @ R.T - target) / norm)
    return errors


@pytest.fixture(scope="module")
def sensing(tmp_path_factory):
    return make_problem(tmp_path_factory.mktemp("p"), problem="sensing", shape=[40, 40], rank=3, condition=5)


@pytest.mark.benchmark(group="scaledgd-vs-numpy")
def test_scaledgd_plugin_torch(benchmark, sensing):
    from rankbench_plugins.solvers.scaledgd import ScaledGD

    solver = ScaledGD()
    result = benchmark(lambda: solver.solve(sensing, 3, seed=0, device="cpu", max_iters=ITERS, tol=0.0))
    reference = numpy_scaledgd(sensing, 3, ITERS)
    np.testing.assert_allclose(result.errors, reference, rtol=1e-6, atol=1e-12)  # same iterates
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / ITERS


@pytest.mark.benchmark(group="scaledgd-vs-numpy")
def test_scaledgd_reference_numpy(benchmark, sensing):
    benchmark(lambda: numpy_scaledgd(sensing, 3, ITERS))
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / ITERS


def numpy_gd_completion(problem, rank, iters, eta=0.5):
    """GD for completion in plain NumPy on dense matrices: spectral start from Y / p, L <- L - (eta / sigma1) Z R,
    R <- R - (eta / sigma1) Z^T L with Z = P_Omega(L R^T - Y) / p (Tong, Ma & Chi 2021's GD baseline)."""
    mask, Y, target = problem.mask.astype(float), problem.observed, problem.target
    p = mask.mean()
    U, s, Vt = np.linalg.svd(Y / p, full_matrices=False)
    L, R = U[:, :rank] * np.sqrt(s[:rank]), Vt[:rank].T * np.sqrt(s[:rank])
    step, norm = eta / s[0], np.linalg.norm(target)
    errors = [np.linalg.norm(L @ R.T - target) / norm]
    for _ in range(iters):
        Z = mask * (L @ R.T - Y) / p
        L, R = L - step * Z @ R, R - step * Z.T @ L
        errors.append(np.linalg.norm(L @ R.T - target) / norm)
    return errors


@pytest.fixture(scope="module")
def completion(tmp_path_factory):
    return make_problem(tmp_path_factory.mktemp("c"), problem="completion", shape=[800, 640], rank=3, observed=0.1)


@pytest.mark.benchmark(group="gd-completion-vs-numpy")
def test_gd_completion_plugin_observed_entries(benchmark, completion):
    from rankbench_plugins.solvers.gd import GD

    result = benchmark(lambda: GD().solve(completion, 3, seed=0, device="cpu", max_iters=ITERS, tol=0.0))
    np.testing.assert_allclose(result.errors, numpy_gd_completion(completion, 3, ITERS), rtol=1e-6, atol=1e-12)
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / ITERS


@pytest.mark.benchmark(group="gd-completion-vs-numpy")
def test_gd_completion_reference_numpy_dense(benchmark, completion):
    benchmark(lambda: numpy_gd_completion(completion, 3, ITERS))
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / ITERS


SOLVER_PROBLEMS = {
    "gd": dict(problem="completion", shape=[300, 200], rank=5),
    "gd-sym": dict(problem="sensing", shape=[30, 30], rank=2, psd=True),
    "scaledgd": dict(problem="completion", shape=[300, 200], rank=5),
    "subgradient-l1": dict(problem="robust", shape=[200, 200], rank=5),
    "altmin": dict(problem="completion", shape=[300, 200], rank=5),
    "bcpf": dict(problem="tensor-completion", shape=[30, 30, 30], rank=4, noise=0.01),
}


@pytest.mark.parametrize("name", sorted(SOLVER_PROBLEMS))
@pytest.mark.benchmark(group="solvers")
def test_solver_iterations(benchmark, tmp_path, name):
    from rankbench.plugins import load_plugins

    info = load_plugins().get("factorization", name)
    problem = make_problem(tmp_path, **SOLVER_PROBLEMS[name])
    solver = info.cls()
    rank = problem.true_rank
    result = benchmark.pedantic(
        lambda: solver.solve(problem, rank, seed=0, device="cpu", max_iters=ITERS, tol=0.0), rounds=3, iterations=1
    )
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / max(result.iterations, 1)
    benchmark.extra_info["iterations"] = result.iterations
