"""pytest-benchmark: per-iteration cost of the recovery solvers, each against a named reference in the same run.

* ``scaledgd-vs-numpy``: 50 ScaledGD iterations on a sensing problem (n = 40, r = 3, m = 5 r (2n - r) measurements)
  through the plugin (torch, float64, error evaluated each iteration), against the same update and error written in
  plain NumPy. The two produce the same iterates (checked), so the ratio is pure implementation overhead.
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
    return task._instance(ctx)[0]


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
