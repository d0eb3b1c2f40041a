"""The ``matrix-recovery`` task and its solvers: generators, known convergence behaviour, and cells end to end."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from rankbench.api import CellFailure, Diverged, Selector
from rankbench.context import CellContext
from rankbench.kinds.recovery import RecoverySolver, SolveResult
from rankbench_plugins.solvers import altmin, gd, gd_sym, scaledgd, subgradient_l1
from rankbench_plugins.solvers.altmin import AltMin
from rankbench_plugins.solvers.gd import GD
from rankbench_plugins.solvers.gd_sym import GDSym
from rankbench_plugins.solvers.scaledgd import ScaledGD
from rankbench_plugins.solvers.subgradient_l1 import SubgradientL1
from rankbench_plugins.tasks import matrix_recovery
from rankbench_plugins.tasks.matrix_recovery import MatrixRecovery, load_movielens_100k, make_problem
from rankbench.kinds import run_cell

Params = MatrixRecovery.Params


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def solve(solver, problem, rank, *, seed=0, max_iters=1000, tol=1e-12):
    return solver.solve(problem, rank, seed=seed, device="cpu", max_iters=max_iters, tol=tol)


def log_slope(errors: np.ndarray, start: int, stop: int) -> float:
    """Least-squares slope of log10(error) against iteration over [start, stop)."""
    steps = np.arange(start, stop)
    return float(np.polyfit(steps, np.log10(errors[start:stop]), 1)[0])


def quarter_slopes(errors) -> tuple[float, float]:
    """Slopes of log10(error) over the second and the last quarter of a run."""
    e = np.asarray(errors, dtype=float)
    q = len(e) // 4
    return log_slope(e, q, 2 * q), log_slope(e, 3 * q, len(e))


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and generators


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(problem="tensor-completion"), "3 entries"),
        (dict(problem="completion", shape=[10, 10, 10]), "2 entries"),
        (dict(psd=True, shape=[30, 20]), "square"),
        (dict(rank=25, shape=[30, 20]), "exceeds"),
        (dict(problem="sensing"), "GiB"),  # the default 300 x 200 shape needs a 46 GiB operator
        (dict(problem="completion", outliers=0.1), "outliers"),
        (dict(problem="completion", observed=2.0), "<= 1"),
        (dict(problem="robust", observed=0.5), "every entry"),
        (dict(problem="sensing", shape=[10, 10], data="movielens-100k"), "completion"),
        (dict(data="movielens-100k", noise=0.1), "real data"),
        (dict(shape=[0, 10]), "positive"),
        (dict(unknown_key=1), "unknown_key"),
    ],
)
def test_params_are_validated_with_clear_messages(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Params(**kwargs)


def test_completion_generator_shape_rank_observed_fraction_noise_and_determinism():
    params = Params(problem="completion", shape=[120, 90], rank=4, condition=5.0, noise=0.1)
    problem = make_problem(params, seed=3)
    X = problem.target
    assert X.shape == (120, 90) and problem.shape == (120, 90)
    assert np.linalg.matrix_rank(X) == 4 == problem.true_rank
    sigma = np.linalg.svd(X, compute_uv=False)[:4]
    assert sigma[0] / sigma[3] == pytest.approx(5.0)  # condition number kappa
    assert np.sqrt(np.mean(X**2)) == pytest.approx(1.0)  # entries scaled to RMS 1
    assert problem.observed_fraction == pytest.approx(0.3, abs=0.02)
    assert np.all(problem.observed[~problem.mask] == 0)
    noise = (problem.observed - X)[problem.mask]
    assert np.std(noise) == pytest.approx(0.1, rel=0.05)  # noise std relative to RMS(X*) = 1
    assert problem.noise_std == pytest.approx(0.1)

    again = make_problem(params, seed=3)
    assert np.array_equal(again.observed, problem.observed) and np.array_equal(again.target, X)
    other = make_problem(params, seed=4)
    assert not np.allclose(other.target, X)


def test_sensing_generator_measurements_operator_and_outliers():
    n1, n2, r = 20, 16, 3
    problem = make_problem(Params(problem="sensing", shape=[n1, n2], rank=r, observed=4.0, noise=0.05), seed=0)
    m = math.ceil(4.0 * r * (n1 + n2 - r))
    assert problem.A.shape == (m, n1 * n2) and problem.y.shape == (m,)
    assert np.var(problem.A) == pytest.approx(1.0 / m, rel=0.02)
    clean = problem.A @ problem.target.reshape(-1)
    rms = np.sqrt(np.mean(clean**2))
    assert np.std(problem.y - clean) == pytest.approx(0.05 * rms, rel=0.15)
    assert problem.noise_std == pytest.approx(0.05 * rms)
    # the back-projection A^*(y) is an unbiased estimate of X* (E A^T A = I)
    assert problem.backprojection().shape == (n1, n2)

    corrupted = make_problem(Params(problem="sensing", shape=[n1, n2], rank=r, outliers=0.2), seed=0)
    hit = np.abs(corrupted.y - corrupted.A @ corrupted.target.reshape(-1)) > 1e-9
    assert hit.mean() == pytest.approx(0.2, abs=0.05)
    assert corrupted.outlier_fraction == 0.2


def test_robust_psd_and_tensor_generators():
    robust = make_problem(Params(problem="robust", shape=[80, 60], rank=2), seed=1)
    assert robust.mask is None and robust.outlier_fraction == 0.1  # default outlier fraction
    outliers = np.abs(robust.observed - robust.target) > 0
    assert outliers.mean() == pytest.approx(0.1, abs=0.02)

    psd = make_problem(Params(problem="completion", shape=[40, 40], rank=3, psd=True), seed=1)
    assert np.allclose(psd.target, psd.target.T) and np.linalg.eigvalsh(psd.target).min() > -1e-9
    assert np.linalg.matrix_rank(psd.target) == 3

    tensor = make_problem(Params(problem="tensor-completion", shape=[12, 10, 8], rank=3), seed=1)
    assert tensor.target.shape == (12, 10, 8) and tensor.mask.shape == (12, 10, 8)
    assert tensor.observed_fraction == pytest.approx(0.5, abs=0.05)
    for mode in range(3):  # every unfolding of a rank-3 CP tensor has rank 3
        unfolding = np.moveaxis(tensor.target, mode, 0).reshape(tensor.shape[mode], -1)
        assert np.linalg.matrix_rank(unfolding) == 3
    site = tensor.site()
    assert len(site.mode_singular_values) == 3


def test_movielens_loader_and_holdout():
    users, items, ratings = load_movielens_100k()
    assert len(ratings) == 100_000 and users.max() + 1 == 943 and items.max() + 1 == 1682
    assert ratings.min() == 1 and ratings.max() == 5 and ratings.mean() == pytest.approx(3.53, abs=0.01)

    problem = make_problem(Params(data="movielens-100k"), seed=0)
    assert problem.problem == "ratings" and problem.shape == (943, 1682) and problem.target is None
    assert problem.mask.sum() == 90_000 and len(problem.holdout_values) == 10_000
    assert not problem.mask.reshape(-1)[problem.holdout_index].any()  # held-out ratings are not observed
    assert problem.error_name == "rmse"
    again = make_problem(Params(data="movielens-100k"), seed=0)
    assert np.array_equal(again.holdout_index, problem.holdout_index)
    assert not np.array_equal(make_problem(Params(data="movielens-100k"), seed=1).holdout_index, problem.holdout_index)


# ---------------------------------------------------------------------------------------------------------------------
# The key claim: linear versus sublinear convergence on one noiseless sensing problem


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asymmetric_gd_and_scaledgd_are_linear_overparameterised_symmetric_gd_is_sublinear(seed):
    """Xiong-Ding-Du (ICLR 2024) and Tong-Ma-Chi (JMLR 2021) on a 20 x 20 rank-2 PSD target, m = 5 r (2n - r).

    Asymmetric GD from a small init with k = 2r and ScaledGD (k = r, spectral init) converge linearly: the slope of
    log(error) stays constant and the error reaches 1e-12. Symmetric GD with k = 2r converges sublinearly: after the
    same budget its error is many orders of magnitude larger, the slope of log(error) flattens, and on a log-log
    scale the error decays like t^-1 (between the Omega(1/T^2) lower bound and no decay at all).
    """
    problem = make_problem(Params(problem="sensing", shape=[20, 20], rank=2, psd=True), seed)
    T = 3000
    small, k2 = dict(init="small", init_scale=0.5), dict(rank_multiplier=2)
    asymmetric = solve(GD(GD.Params(**small, **k2)), problem, 2, seed=seed, max_iters=T)
    scaled = solve(ScaledGD(), problem, 2, seed=seed, max_iters=T)
    symmetric = solve(GDSym(GDSym.Params(**small, **k2)), problem, 2, seed=seed, max_iters=T)

    for result in (asymmetric, scaled):
        assert result.converged and result.errors[-1] < 1e-12
        second, last = quarter_slopes(result.errors)
        assert second < -1e-3 and last < -1e-3
        # a constant rate: linear convergence (a power law t^-a gives last / second = ln(4/3) / ln(2) = 0.42)
        assert 0.75 < last / second < 1.33

    e = np.asarray(symmetric.errors)
    assert len(e) == T + 1 and not symmetric.converged
    stopped = len(asymmetric.errors) - 1  # compare after the same number of iterations
    assert e[stopped] > 1e4 * asymmetric.errors[-1] and e[-1] > 1e-5
    second, last = quarter_slopes(e)
    assert last / second < 0.6  # the log-error flattens: sublinear
    steps = np.arange(T // 4, T + 1)
    loglog = np.polyfit(np.log(steps), np.log(e[T // 4 :]), 1)[0]
    assert -2.0 < loglog < -0.7

    # the slowdown comes from over-parameterisation: symmetric GD with k = r converges linearly again
    exact = solve(GDSym(GDSym.Params(**small)), problem, 2, seed=seed, max_iters=T)
    assert exact.converged and len(exact.errors) < len(asymmetric.errors)


# ---------------------------------------------------------------------------------------------------------------------
# Every solver on every problem type it supports


SENSING = Params(problem="sensing", shape=[20, 20], rank=2)
SENSING_PSD = Params(problem="sensing", shape=[20, 20], rank=2, psd=True)
SENSING_OUTLIERS = Params(problem="sensing", shape=[20, 20], rank=2, outliers=0.1)
COMPLETION = Params(problem="completion", shape=[60, 50], rank=2)
COMPLETION_PSD = Params(problem="completion", shape=[50, 50], rank=2, psd=True)
ROBUST = Params(problem="robust", shape=[100, 80], rank=2)


GEOMETRIC = SubgradientL1.Params(step_rule="geometric")
CASES = {
    "gd-sensing": (GD(), SENSING),
    "gd-small-init-sensing": (GD(GD.Params(init="small")), SENSING),
    "gd-completion": (GD(), COMPLETION),
    "gd-robust": (GD(), ROBUST),
    "scaledgd-sensing": (ScaledGD(), SENSING),
    "scaledgd-completion": (ScaledGD(), COMPLETION),
    "scaledgd-robust": (ScaledGD(), ROBUST),
    "gd-sym-sensing": (GDSym(), SENSING_PSD),
    "gd-sym-completion": (GDSym(), COMPLETION_PSD),
    "subgradient-polyak-sensing-outliers": (SubgradientL1(), SENSING_OUTLIERS),
    "subgradient-geometric-sensing-outliers": (SubgradientL1(GEOMETRIC), SENSING_OUTLIERS),
    "subgradient-polyak-robust": (SubgradientL1(), ROBUST),
    "subgradient-geometric-robust": (SubgradientL1(GEOMETRIC), ROBUST),
    "altmin-completion": (AltMin(), COMPLETION),
}


@pytest.mark.parametrize("solver, params", list(CASES.values()), ids=list(CASES))
def test_each_solver_recovers_an_easy_noiseless_problem(solver, params):
    problem = make_problem(params, seed=0)
    assert solver.skip(MatrixRecovery(params), None) is None
    result = solve(solver, problem, params.rank, max_iters=1500, tol=1e-9)
    assert result.errors[-1] < 1e-6
    assert problem.error(result.estimate) == pytest.approx(result.errors[-1], rel=1e-6, abs=1e-12)
    assert result.estimate.shape == problem.shape and len(result.errors) == result.iterations + 1


@pytest.mark.parametrize("solver", [ScaledGD(), AltMin()], ids=["scaledgd", "altmin"])
def test_noisy_completion_reaches_the_noise_level(solver):
    problem = make_problem(Params(problem="completion", shape=[100, 80], rank=2, noise=0.1), seed=0)
    result = solve(solver, problem, 2, max_iters=300, tol=0)
    # a rank-2 fit keeps the noise in a small subspace: the error is well below the per-entry noise level
    assert 0.005 < result.errors[-1] < 0.05


def test_solvers_are_deterministic_given_the_seed():
    problem = make_problem(SENSING, seed=0)
    solver = GD(GD.Params(init="small", rank_multiplier=2))
    first, second = (solve(solver, problem, 2, seed=7, max_iters=50) for _ in range(2))
    assert first.errors == second.errors
    assert solve(solver, problem, 2, seed=8, max_iters=50).errors != first.errors


def test_altmin_on_movielens_beats_the_global_mean():
    problem = make_problem(Params(data="movielens-100k"), seed=0)
    train = problem.observed[problem.mask]
    mean_rmse = float(np.sqrt(np.mean((problem.holdout_values - train.mean()) ** 2)))
    assert mean_rmse == pytest.approx(1.12, abs=0.02)
    result = solve(AltMin(AltMin.Params(reg=1.0)), problem, 2, max_iters=10, tol=0)
    assert result.errors[-1] < mean_rmse - 0.1  # about 0.92


def test_skip_reasons():
    completion = MatrixRecovery(COMPLETION)
    assert "PSD" in GDSym().skip(completion, None)
    assert GDSym().skip(MatrixRecovery(COMPLETION_PSD), None) is None
    assert "does not solve completion" in SubgradientL1().skip(completion, None)
    assert "does not solve sensing" in AltMin().skip(MatrixRecovery(SENSING), None)
    ratings = MatrixRecovery(Params(data="movielens-100k"))
    assert AltMin().skip(ratings, None) is None and GD().skip(ratings, None) is None
    assert "ratings" in GDSym().skip(ratings, None)


def test_plugins_register_through_their_hooks():
    registered = []
    matrix_recovery.rankbench_register_tasks(registered.append)
    for module in (gd, gd_sym, scaledgd, subgradient_l1, altmin):
        module.rankbench_register_factorizations(registered.append)
    names = [cls.name for cls in registered]
    assert names == ["matrix-recovery", "gd", "gd-sym", "scaledgd", "subgradient-l1", "altmin"]
    for cls in registered:
        assert cls.version == "1" and cls.description
        assert "(" in sys.modules[cls.__module__].__doc__  # every plugin file opens with its paper
        assert cls.Params().model_dump() is not None
        with pytest.raises(ValidationError):
            cls.Params(not_a_parameter=1)


# ---------------------------------------------------------------------------------------------------------------------
# The task end to end through a CellContext


class FixedRank(Selector):
    name = "fixed-rank"

    def __init__(self, rank):
        super().__init__()
        self.rank = rank
        self.seen = None

    def select(self, problem):
        self.seen = problem
        return {problem.sites[0].name: self.rank}


def context(tmp_path, shared=None, task_seed=0, seed=0):
    return CellContext(
        cell_id="t",
        seed=seed,
        task_seed=task_seed,
        device="cpu",
        budget=5,
        budget_kind="rank_cap",
        shared=shared if shared is not None else {},
        cache_dir=tmp_path,
    )


def metrics_of(ctx):
    return {m["metric"]: m["value"] for m in ctx.metrics}


def test_task_cell_end_to_end(tmp_path):
    task = MatrixRecovery(Params(problem="completion", shape=[80, 60], rank=3, observed=0.4, max_iters=1000, tol=1e-10))
    shared = {}
    ctx = context(tmp_path, shared)
    task.setup(ctx)
    selector = FixedRank(3)
    run_cell(task, ctx, selector, ScaledGD())

    seen = selector.seen
    assert seen.budget == 5 and seen.budget_kind == "rank_cap" and seen.sites[0].shape == (80, 60)
    assert len(seen.sites[0].singular_values) == 60
    m = metrics_of(ctx)
    assert m["rel_error"] < 1e-10 and m["converged"] == 1.0
    assert m["rank_selected"] == 3 and m["rank_true"] == 3
    assert m["params"] == 3 * 140 and m["param_ratio"] == pytest.approx(420 / 4800)
    assert 0 < m["iterations_to_tol"] == m["iterations"]
    assert 0 <= m["seconds_to_tol"] <= ctx.timer.seconds["solve"]
    assert {"select", "solve"} <= set(ctx.timer.seconds)
    assert ctx.ranks_rows == [{"site": "X", "rank": 3, "rank_per_mode": "3", "params": 420}]
    curve = [row for row in ctx.curve_rows if row["curve"] == "rel_error"]
    assert len(curve) == m["iterations"] + 1 and curve[-1]["value"] == pytest.approx(m["rel_error"])

    # the instance is memoised per task seed: every cell of this configuration sees the same problem
    problem = shared[("matrix-recovery", 0)][0]
    run_cell(task, context(tmp_path, shared, seed=1), FixedRank(2), GD())
    assert shared[("matrix-recovery", 0)][0] is problem
    task.recovery_instance(context(tmp_path, shared, task_seed=1))
    assert shared[("matrix-recovery", 1)][0] is not problem

    reference = context(tmp_path, shared)
    run_cell(task, reference)
    ref = metrics_of(reference)
    assert ref["params"] == 4800 and ref["param_ratio"] == 1.0
    assert ref["rel_error"] == pytest.approx(problem.error(problem.backprojection()))


def test_task_records_no_seconds_to_tol_when_not_converged(tmp_path):
    task = MatrixRecovery(Params(problem="sensing", shape=[20, 20], rank=2, psd=True, max_iters=50))
    ctx = context(tmp_path)
    run_cell(task, ctx, FixedRank(2), GDSym(GDSym.Params(rank_multiplier=2)))
    m = metrics_of(ctx)
    assert m["converged"] == 0.0 and m["iterations"] == 50 and m["rank_selected"] == 4
    assert "iterations_to_tol" not in m and "seconds_to_tol" not in m
    assert m["params"] == 4 * 20  # gd-sym stores one 20 x 4 factor


def test_task_on_movielens_records_rmse(tmp_path):
    task = MatrixRecovery(Params(data="movielens-100k", max_iters=8))
    ctx = context(tmp_path)
    run_cell(task, ctx, FixedRank(2), AltMin(AltMin.Params(reg=1.0)))
    m = metrics_of(ctx)
    assert m["rmse"] < 1.0 and "rel_error" not in m and "rank_true" not in m
    assert m["converged"] == 0.0 and m["params"] == 2 * (943 + 1682)
    assert {row["curve"] for row in ctx.curve_rows} == {"rmse"}


class ScriptedSolver(RecoverySolver):
    """Returns a fixed curve, for checking the task's bookkeeping."""

    name = "scripted"
    problems = frozenset({"completion", "tensor-completion"})

    def __init__(self, errors, rank=None):
        super().__init__()
        self.errors, self.rank, self.got = errors, rank, None

    def solve(self, problem, rank, *, seed, device, max_iters, tol):
        self.got = rank
        iterations = len(self.errors) - 1
        return SolveResult(np.zeros(problem.shape), self.errors, iterations, rank=self.rank)


@pytest.mark.parametrize("errors", [[1.0, 0.5, 2e6], [1.0, float("nan")], [1.0, float("inf")]])
def test_task_raises_diverged(tmp_path, errors):
    task = MatrixRecovery(Params(shape=[30, 20], rank=2))
    with pytest.raises(Diverged):
        run_cell(task, context(tmp_path), FixedRank(2), ScriptedSolver(errors))


def test_task_tensor_site_uses_the_largest_mode_rank_and_estimated_time(tmp_path):
    task = MatrixRecovery(Params(problem="tensor-completion", shape=[10, 9, 8], rank=2, tol=1e-3))
    ctx = context(tmp_path)
    solver = ScriptedSolver([1.0, 1e-2, 1e-4, 1e-5])
    run_cell(task, ctx, FixedRank((2, 3, 2)), solver)
    assert solver.got == 3
    m = metrics_of(ctx)
    assert m["rank_selected"] == 3 and m["params"] == 3 * 27 and m["iterations_to_tol"] == 2
    # without per-iteration times, time to tolerance is the solve time scaled by iterations_to_tol / iterations
    assert m["seconds_to_tol"] == pytest.approx(ctx.timer.seconds["solve"] * 2 / 3)
    assert ctx.ranks_rows == [{"site": "X", "rank": 3, "rank_per_mode": "2x3x2", "params": 81}]

    ctx = context(tmp_path)
    run_cell(task, ctx, FixedRank((2, 3, 2)), ScriptedSolver([1.0, 1e-4], rank=5))  # the solver determined the rank
    assert metrics_of(ctx)["rank_selected"] == 5 and ctx.ranks_rows[0]["rank_per_mode"] == "5"


def test_scaledgd_rate_is_independent_of_the_condition_number_gd_slows_down():
    """Tong-Ma-Chi (JMLR 2021), sensing: iterations to 1e-10 for kappa = 1 and 10 (measured: GD 145 -> 909,
    ScaledGD 126 -> 125 on this instance)."""
    iterations = {}
    for kappa in (1.0, 10.0):
        problem = make_problem(Params(problem="sensing", shape=[30, 30], rank=3, condition=kappa), seed=0)
        for solver in (GD(), ScaledGD()):
            result = solve(solver, problem, 3, max_iters=3000, tol=1e-10)
            assert result.converged
            iterations[solver.name, kappa] = result.iterations
    assert iterations["gd", 10.0] > 4 * iterations["gd", 1.0]
    assert iterations["scaledgd", 10.0] == pytest.approx(iterations["scaledgd", 1.0], rel=0.15)


@pytest.mark.parametrize(
    "problem, solvers",
    [
        ("completion", [GD(), ScaledGD(), AltMin()]),
        # the Polyak rule is slow here (rel_error 1.7e-4 after 1000 iterations); the geometric rule converges
        ("robust", [GD(), ScaledGD(), SubgradientL1(GEOMETRIC)]),
    ],
)
def test_default_sized_cells_converge(tmp_path, problem, solvers):
    """The task's default size (300 x 200, rank 5) end to end, as a suite would run it."""
    task = MatrixRecovery(Params(problem=problem, max_iters=1500))
    shared = {}
    for solver in solvers:
        ctx = context(tmp_path, shared)
        run_cell(task, ctx, FixedRank(5), solver)
        m = metrics_of(ctx)
        assert m["converged"] == 1.0 and m["rel_error"] < 1e-10, solver.name


class NamedRanks(Selector):
    name = "named-ranks"

    def __init__(self, ranks):
        super().__init__()
        self.answer = ranks

    def select(self, problem):
        return self.answer


@pytest.mark.parametrize("ranks, message", [({"Y": 2}, "no rank for site 'X'"), ({"X": 0}, "chose rank 0")])
def test_task_rejects_unusable_selector_answers(tmp_path, ranks, message):
    task = MatrixRecovery(Params(shape=[30, 20], rank=2))
    with pytest.raises(CellFailure, match=message):
        run_cell(task, context(tmp_path), NamedRanks(ranks), GD())


@pytest.mark.parametrize("solver_cls", [GD, ScaledGD])
@pytest.mark.parametrize("params", [dict(problem="completion", shape=[300, 240], rank=3, observed=0.1),
                                    dict(problem="completion", shape=[260, 260], rank=2, observed=0.2, noise=0.01)])
def test_completion_on_observed_entries_gives_the_dense_iterates(solver_cls, params, monkeypatch):
    """Z formed at the observed entries (sparse) and the ARPACK spectral start step exactly as the dense masked
    gradient from the dense SVD does."""
    from rankbench_plugins.solvers import _factored

    problem = make_problem(matrix_recovery.MatrixRecoveryParams(**params), 5)
    assert problem.observed.size >= _factored.SPARSE_FROM

    class Dense(solver_cls):
        observed_entries = False

        def solve(self, *args, **kwargs):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_factored, "SPARSE_FROM", 10**12)  # every dense route
                return super().solve(*args, **kwargs)

    ours = solve(solver_cls(), problem, params["rank"], max_iters=60, tol=0.0)
    dense = solve(Dense(), problem, params["rank"], max_iters=60, tol=0.0)
    np.testing.assert_allclose(ours.estimate, dense.estimate, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.errors, dense.errors, rtol=1e-8, atol=1e-14)


def test_the_factored_error_is_the_dense_error_down_to_rounding():
    """||L R^T - X*|| from QR factors of [L, -U S] and [R, V] equals the dense norm, even 1e-12 away from X*."""
    import torch

    from rankbench_plugins.solvers._factored import Objective

    problem = make_problem(matrix_recovery.MatrixRecoveryParams(problem="completion", shape=[300, 240], rank=4), 1)
    obj = Objective(problem, "cpu")
    assert obj.target_factors is not None and obj.target_factors[0].shape[1] == 4
    U, s, Vh = torch.linalg.svd(obj.target, full_matrices=False)
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-6, 1e-12):
        L = U[:, :4] * s[:4].sqrt() + scale * torch.randn(300, 4, generator=gen, dtype=torch.float64)
        R = Vh[:4].T * s[:4].sqrt()
        dense = float(torch.linalg.norm(L @ R.T - obj.target) / obj.target_norm)
        assert obj.error(L, R) == pytest.approx(dense, rel=1e-6, abs=1e-15)
