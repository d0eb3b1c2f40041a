"""Tests of BCPF (``rankbench.kinds.bcpf_core`` and its solver ``rankbench_plugins.solvers.bcpf``) and the ``ard`` selector (``rankbench_plugins.selectors.ard``).

Known answers: synthetic CP tensors / low-rank matrices of known rank, a hand-written numpy solution of one factor
update, the monotonicity of the variational lower bound, and CP-ALS from tensorly at the true rank.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from rankbench.api import RankProblem, Site
from rankbench.kinds.recovery import RecoveryProblem
from rankbench_plugins.selectors import ard as ard_module
from rankbench_plugins.selectors.ard import ARDSelector
from rankbench_plugins.solvers import bcpf as bcpf_module
from rankbench.kinds.bcpf_core import bcpf, cp_full, default_max_rank, factor_update, rebalance_scales
from rankbench_plugins.solvers.bcpf import BCPFSolver


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------------------------------------------
# synthetic data


def cp_tensor(dims, rank, rng):
    factors = [rng.standard_normal((d, rank)) for d in dims]
    letters = "abcdefg"[: len(dims)]
    spec = ",".join(c + "z" for c in letters) + "->" + letters
    return np.einsum(spec, *factors)


def noisy_incomplete(dims, rank, seed, *, observed=0.5, snr_db=20.0):
    """(target, noisy observations with zeros where missing, mask, relative noise level = noise std / signal std)."""
    rng = np.random.default_rng(seed)
    target = cp_tensor(dims, rank, rng)
    noise_rel = 10.0 ** (-snr_db / 20.0)
    noisy = target + noise_rel * target.std() * rng.standard_normal(target.shape)
    mask = rng.random(target.shape) < observed
    return target, np.where(mask, noisy, 0.0), mask, noise_rel


def missing_error(estimate, target, mask):
    miss = ~mask
    return float(np.linalg.norm((estimate - target)[miss]) / np.linalg.norm(target[miss]))


# ------------------------------------------------------------------------------------------------------------------
# BCPF: rank recovery and fit


@pytest.mark.parametrize("rank", [3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bcpf_recovers_cp_rank_with_half_missing(rank, seed):
    """20x20x20, 50% observed, SNR 20 dB, from max_rank = 2 * rank + 2: the true rank, and the missing entries
    completed to well below the noise level (per-entry noise is 10% of the signal; the estimate's error ~2-3%)."""
    target, observed, mask, noise_rel = noisy_incomplete((20, 20, 20), rank, seed)
    result = bcpf(observed, mask, max_rank=2 * rank + 2, max_iters=100, tol=1e-5, seed=seed)
    assert result.rank == rank
    assert result.converged
    assert missing_error(result.estimate, target, mask) < 0.5 * noise_rel
    assert [f.shape for f in result.factors] == [(20, rank)] * 3
    # the noise precision, in the data's units, is close to 1 / sigma^2
    sigma = noise_rel * (observed[mask].std())
    assert 0.7 < result.tau * sigma**2 < 1.3


def test_bcpf_four_way_and_unequal_dims():
    """N = 4 with all mode sizes different: the true rank is found and the completion is good."""
    target, observed, mask, noise_rel = noisy_incomplete((8, 9, 10, 11), 3, seed=0)
    result = bcpf(observed, mask, max_rank=6)
    assert result.rank == 3
    assert missing_error(result.estimate, target, mask) < 0.5 * noise_rel


def test_bcpf_noiseless_fully_observed_reconstructs():
    rng = np.random.default_rng(0)
    target = cp_tensor((15, 20, 25), 4, rng)
    result = bcpf(target, None, max_rank=8)
    assert result.rank == 4
    assert np.linalg.norm(result.estimate - target) / np.linalg.norm(target) < 1e-6


def test_bcpf_noiseless_incomplete_completes():
    rng = np.random.default_rng(1)
    target = cp_tensor((15, 20, 25), 4, rng)
    mask = rng.random(target.shape) < 0.5
    result = bcpf(np.where(mask, target, 0.0), mask, max_rank=8)
    assert result.rank == 4
    assert missing_error(result.estimate, target, mask) < 1e-5


def test_bcpf_nan_entries_are_missing_and_input_checks():
    target, observed, mask, _ = noisy_incomplete((10, 12, 14), 2, seed=7)
    with_nan = np.where(mask, observed, np.nan)
    a = bcpf(with_nan, None, max_rank=4)
    b = bcpf(observed, mask, max_rank=4)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        bcpf(with_nan, np.ones(mask.shape, bool), max_rank=4)
    with pytest.raises(ValueError, match="at least 2 modes"):
        bcpf(np.ones(5), None)
    with pytest.raises(ValueError, match="mask shape"):
        bcpf(observed, mask[:5])


@pytest.mark.parametrize("rebalance", [True, False])
def test_lower_bound_never_decreases(rebalance):
    """Every step is a coordinate ascent of the bound: L(t) >= L(t-1) whenever no component was pruned in between."""
    _, observed, mask, _ = noisy_incomplete((12, 15, 18), 3, seed=4)
    result = bcpf(observed, mask, max_rank=6, max_iters=60, tol=0.0, rebalance=rebalance)
    bound = np.array([h["lower_bound"] for h in result.history])
    rank = np.array([h["rank"] for h in result.history])
    same_rank = rank[1:] == rank[:-1]
    assert same_rank.sum() > 40
    steps = np.diff(bound)[same_rank]
    assert steps.min() > -1e-9 * np.abs(bound).max()


def test_rebalancing_reaches_a_higher_bound_sooner():
    """With the exact rebalancing step the bound after 50 sweeps is above that of plain BCPF (same fixed points)."""
    _, observed, mask, _ = noisy_incomplete((12, 15, 18), 3, seed=4)
    plain = bcpf(observed, mask, max_rank=6, max_iters=50, tol=0.0, rebalance=False)
    balanced = bcpf(observed, mask, max_rank=6, max_iters=50, tol=0.0, rebalance=True)
    assert balanced.history[-1]["lower_bound"] > plain.history[-1]["lower_bound"]


# ------------------------------------------------------------------------------------------------------------------
# one update against an independent numpy computation


def _tiny_state(seed, dims=(3, 4, 5), R=2, observed=0.6, with_covariance=True):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(dims)
    mask = rng.random(dims) < observed
    means = [rng.standard_normal((d, R)) for d in dims]
    covs = []
    for d in dims:
        if with_covariance:
            A = rng.standard_normal((d, R, R))
            covs.append(A @ A.transpose(0, 2, 1) / R + 0.1 * np.eye(R))
        else:
            covs.append(np.zeros((d, R, R)))
    tau = 2.5
    lambdas = rng.random(R) + 0.5
    return data * mask, mask, means, covs, tau, lambdas


def _torch_update(n, data, mask, means, covs, tau, lambdas):
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    mean, cov, _, _ = factor_update(
        n, t(data), None if mask is None else t(mask), [t(m) for m in means], [t(c) for c in covs], tau, t(lambdas)
    )
    return mean.numpy(), cov.numpy()


@pytest.mark.parametrize("n", [0, 1, 2])
def test_factor_mean_update_is_regularised_weighted_least_squares(n):
    """With the other factors known exactly (zero covariance), the row update is the ridge solution
    argmin_a tau * sum_{j observed, j_n = i} (y_j - h_j^T a)^2 + a^T diag(lambda) a,  h_j = prod_{k != n} z^(k)_{j_k},
    solved here with numpy's least squares on the stacked system [sqrt(tau) H; diag(sqrt(lambda))] a = [sqrt(tau) y; 0].
    """
    data, mask, means, covs, tau, lambdas = _tiny_state(0, with_covariance=False)
    mean, cov = _torch_update(n, data, mask, means, covs, tau, lambdas)
    R = len(lambdas)
    for i in range(data.shape[n]):
        rows, targets = [], []
        for j in zip(*np.nonzero(mask)):
            if j[n] != i:
                continue
            h = np.ones(R)
            for k in range(data.ndim):
                if k != n:
                    h = h * means[k][j[k]]
            rows.append(np.sqrt(tau) * h)
            targets.append(np.sqrt(tau) * data[j])
        A = np.vstack(rows + [np.diag(np.sqrt(lambdas))]) if rows else np.diag(np.sqrt(lambdas))
        b = np.concatenate([np.array(targets), np.zeros(R)]) if rows else np.zeros(R)
        expected, *_ = np.linalg.lstsq(A, b, rcond=None)
        np.testing.assert_allclose(mean[i], expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov[i], np.linalg.inv(A.T @ A), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_factor_update_uses_second_moments_of_the_other_factors(n):
    """The full posterior of a row given the others' moments: V_i = (tau sum_j E[h_j h_j^T] + diag(lambda))^-1 with
    E[h h^T] = prod_k (m m^T + V) entrywise, m_i = tau V_i sum_j y_j E[h_j]; entry-by-entry loops in numpy."""
    data, mask, means, covs, tau, lambdas = _tiny_state(1, with_covariance=True)
    mean, cov = _torch_update(n, data, mask, means, covs, tau, lambdas)
    R = len(lambdas)
    for i in range(data.shape[n]):
        precision = np.diag(lambdas).astype(float)
        rhs = np.zeros(R)
        for j in zip(*np.nonzero(mask)):
            if j[n] != i:
                continue
            ehh = np.ones((R, R))
            eh = np.ones(R)
            for k in range(data.ndim):
                if k != n:
                    m = means[k][j[k]]
                    ehh = ehh * (np.outer(m, m) + covs[k][j[k]])
                    eh = eh * m
            precision += tau * ehh
            rhs += tau * data[j] * eh
        np.testing.assert_allclose(cov[i], np.linalg.inv(precision), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mean[i], np.linalg.solve(precision, rhs), rtol=1e-10, atol=1e-12)


def test_full_and_masked_paths_agree():
    """All-observed data: the shared-covariance path equals the per-row path with a mask of ones."""
    data, _, means, covs, tau, lambdas = _tiny_state(2, dims=(4, 5, 6), R=3)
    ones = np.ones(data.shape)
    for n in range(3):
        full = _torch_update(n, data, None, means, covs, tau, lambdas)
        masked = _torch_update(n, data, ones, means, covs, tau, lambdas)
        np.testing.assert_allclose(full[0], masked[0], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(full[1], masked[1], rtol=1e-11, atol=1e-12)


def test_rebalance_keeps_the_model_and_balances_equal_modes():
    data, _, means, covs, _, lambdas = _tiny_state(3, dims=(5, 5, 5), R=3)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    m = [t(x) for x in means]
    v = [t(x) for x in covs]
    before = cp_full(m)
    rebalance_scales(m, v, t(lambdas), [5, 5, 5])
    torch.testing.assert_close(cp_full(m), before, rtol=1e-12, atol=1e-12)
    power = torch.stack([(x**2).sum(0) + torch.diagonal(c, dim1=-2, dim2=-1).sum(0) for x, c in zip(m, v)])
    torch.testing.assert_close(power, power[:1].expand_as(power), rtol=1e-10, atol=0.0)


# ------------------------------------------------------------------------------------------------------------------
# against tensorly's CP-ALS at the true rank


def test_bcpf_is_as_good_as_tensorly_cp_als_at_the_true_rank():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    for seed, rank in [(0, 3), (1, 4), (2, 5)]:
        target, observed, mask, _ = noisy_incomplete((20, 20, 20), rank, seed)
        result = bcpf(observed, mask, max_rank=2 * rank, seed=seed)
        cp = parafac(
            tl.tensor(observed), rank, mask=tl.tensor(mask.astype(float)), init="svd", n_iter_max=500, tol=1e-10
        )
        err_tl = missing_error(np.asarray(tl.cp_to_tensor(cp)), target, mask)
        err_bcpf = missing_error(result.estimate, target, mask)
        assert err_bcpf <= 1.5 * err_tl, (seed, rank, err_bcpf, err_tl)


# ------------------------------------------------------------------------------------------------------------------
# the solver plugin


def tensor_problem(seed=0, rank=4):
    target, observed, mask, noise_rel = noisy_incomplete((20, 20, 20), rank, seed)
    return RecoveryProblem(
        problem="tensor-completion",
        shape=target.shape,
        target=target,
        true_rank=rank,
        noise_std=noise_rel * target.std(),
        observed=observed,
        mask=mask,
    )


def matrix_completion_problem(m, n, rank, seed, observed=0.4, snr_db=20.0):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    sigma = 10.0 ** (-snr_db / 20.0) * target.std()
    mask = rng.random(target.shape) < observed
    noisy = target + sigma * rng.standard_normal(target.shape)
    return RecoveryProblem(
        problem="completion",
        shape=target.shape,
        target=target,
        true_rank=rank,
        noise_std=sigma,
        observed=np.where(mask, noisy, 0.0),
        mask=mask,
    )


def test_solver_plugin_tensor_completion():
    problem = tensor_problem(seed=5, rank=4)
    res = BCPFSolver().solve(problem, 10, seed=0, device="cpu", max_iters=100, tol=1e-5)
    assert res.rank == 4
    assert res.converged
    assert len(res.errors) == res.iterations + 1
    assert res.estimate.shape == (20, 20, 20)
    assert res.errors[-1] == pytest.approx(problem.error(res.estimate))
    assert res.errors[-1] < 0.05
    assert res.errors[-1] < res.errors[1]


def test_solver_plugin_matrix_completion():
    problem = matrix_completion_problem(60, 80, 4, seed=0, observed=0.5)
    res = BCPFSolver().solve(problem, 12, seed=0, device="cpu", max_iters=100, tol=1e-5)
    assert res.rank == 4
    assert res.errors[-1] < 0.1
    assert len(res.errors) == res.iterations + 1


def test_solver_plugin_contract():
    assert BCPFSolver.name == "bcpf"
    assert BCPFSolver.problems == frozenset({"completion", "tensor-completion", "ratings"})
    with pytest.raises(ValidationError):
        BCPFSolver.Params(not_a_param=1)
    registered = []
    bcpf_module.rankbench_register_factorizations(register=registered.append)
    assert registered == [BCPFSolver]

    class FakeTaskParams:
        problem = "sensing"
        data = None

    class FakeTask:
        params = FakeTaskParams()

    assert "does not solve sensing" in BCPFSolver().skip(FakeTask(), None)


# ------------------------------------------------------------------------------------------------------------------
# the ard selector


def select(sites, seed=0, **params):
    problem = RankProblem(sites=sites, budget=None, budget_kind=None, seed=seed)
    return ARDSelector(ARDSelector.Params(**params)).select(problem)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ard_fully_observed_noisy_matrix(seed):
    rng = np.random.default_rng(seed)
    rank = 5
    target = rng.standard_normal((60, rank)) @ rng.standard_normal((rank, 80))
    noisy = target + 0.1 * target.std() * rng.standard_normal(target.shape)  # SNR 20 dB
    site = Site(name="W", shape=noisy.shape, data=noisy)
    assert select([site], seed=seed) == {"W": rank}


@pytest.mark.parametrize("seed", [0, 1])
def test_ard_matrix_completion(seed):
    """40% observed 100 x 120 rank-5 matrix, from the default max_rank = min(shape) = 100 components."""
    problem = matrix_completion_problem(100, 120, 5, seed=seed, observed=0.4)
    assert select([problem.site()], seed=seed) == {"X": 5}


def test_ard_matrix_completion_30_percent():
    problem = matrix_completion_problem(100, 120, 3, seed=3, observed=0.3)
    assert select([problem.site()], max_rank=20) == {"X": 3}


def test_ard_tensor_site_answers_per_mode():
    problem = tensor_problem(seed=6, rank=3)
    site = problem.site()
    assert site.mode_singular_values is not None
    assert select([site], max_rank=8) == {"X": (3, 3, 3)}


def test_ard_contract():
    selector = ARDSelector()
    assert selector.name == "ard"
    assert selector.uses_budget(None) is False and selector.uses_budget("param_ratio") is False
    with pytest.raises(ValidationError):
        ARDSelector.Params(bogus=True)
    with pytest.raises(ValueError, match="ard needs the site's data"):
        select([Site(name="W", shape=(10, 12), singular_values=np.ones(10))])
    registered = []
    ard_module.rankbench_register_selectors(register=registered.append)
    assert registered == [ARDSelector]


def test_one_default_starting_rank_for_ard_and_bcpf(monkeypatch):
    """Both plugins start from ``bcpf_core.default_max_rank``: max(dims) for a tensor (the reference's), min(dims)
    for a matrix (its largest possible rank)."""
    assert default_max_rank((20, 30, 10)) == 30 and default_max_rank((60, 80)) == 60
    starts = []

    def spy(data, mask=None, **kw):
        starts.append(kw.get("max_rank"))
        return bcpf(data, mask, **kw)

    monkeypatch.setattr(ard_module, "bcpf", spy)
    rng = np.random.default_rng(0)
    for shape in [(12, 15), (6, 7, 8)]:
        data = cp_tensor(shape, 2, rng)
        select([Site(name="W", shape=shape, data=data)])
        assert starts[-1] == default_max_rank(shape)  # ard's default
        # bcpf's own default (no pruning in the first sweep, so its history shows the starting rank)
        assert bcpf(data, None, max_iters=1).history[0]["rank"] == default_max_rank(shape)


def test_ard_pure_noise_gives_rank_at_least_one():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((30, 40))
    ranks = select([Site(name="N", shape=noise.shape, data=noise)])
    assert ranks["N"] >= 1


# ------------------------------------------------------------------------------------------------------------------
# slower checks


def test_bcpf_rank_recovery_sweep():
    """8 seeds x ranks 3, 4, 5 at 50% observed, SNR 20 dB, from max_rank = 2 * rank: all exact."""
    found = {}
    for rank in (3, 4, 5):
        for seed in range(8):
            target, observed, mask, noise_rel = noisy_incomplete((20, 20, 20), rank, seed)
            result = bcpf(observed, mask, max_rank=2 * rank, seed=seed)
            found[(rank, seed)] = result.rank
            assert missing_error(result.estimate, target, mask) < 0.5 * noise_rel
    assert all(k[0] == v for k, v in found.items()), found


SWEEP_SEEDS = range(4)


@pytest.mark.slow
@pytest.mark.parametrize("missing", [0.5, 0.7, 0.8, 0.9])
def test_rank_recovered_across_missing_fractions_and_starting_ranks(missing):
    """True rank 3, SNR 20 dB, 50-90 % of the entries missing, 4 seeds. A 20 x 20 x 20 tensor (bcpf) from 6, 9 and
    the default (max dims = 20) components, and a 100 x 120 matrix (the ard selector) from 6, 9 and the default
    (min dims = 100): the rank found is 3 everywhere, except from the default for the matrix at 90 % missing,
    where the 100 starting components are shrunk away with the signal (a known limitation, asserted below; from
    max dims = 120 that already happens at 85 %, which is why a matrix starts from min dims)."""
    tensor_dims, matrix_dims = (20, 20, 20), (100, 120)
    assert default_max_rank(tensor_dims) == 20 and default_max_rank(matrix_dims) == 100
    found = {}
    for seed in SWEEP_SEEDS:
        target, observed, mask, noise_rel = noisy_incomplete(tensor_dims, 3, seed, observed=1 - missing)
        for start in (6, 9, None):
            result = bcpf(observed, mask, max_rank=start, seed=seed)
            found[("tensor", start, seed)] = result.rank
            if missing <= 0.8:
                assert missing_error(result.estimate, target, mask) < noise_rel
        _, observed, mask, _ = noisy_incomplete(matrix_dims, 3, seed, observed=1 - missing)
        site = Site(name="X", shape=matrix_dims, data=observed, mask=mask)
        for start in (6, 9, None):
            params = {} if start is None else {"max_rank": start}
            found[("matrix", start, seed)] = select([site], seed=seed, **params)["X"]
    failing = {key: rank for key, rank in found.items() if rank != 3}
    if missing < 0.9:
        assert failing == {}
    else:  # the known limitation, and nothing else
        assert failing and all(kind == "matrix" and start is None for kind, start, _ in failing)


@pytest.mark.slow
def test_bcpf_from_max_rank_20():
    target, observed, mask, noise_rel = noisy_incomplete((20, 20, 20), 4, 0)
    result = bcpf(observed, mask, max_rank=20)
    assert result.rank == 4
    assert missing_error(result.estimate, target, mask) < 0.5 * noise_rel


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bcpf_on_cuda_matches_cpu():
    _, observed, mask, _ = noisy_incomplete((20, 20, 20), 4, 1)
    start = time.perf_counter()
    cpu = bcpf(observed, mask, max_rank=8, device="cpu")
    cuda = bcpf(observed, mask, max_rank=8, device="cuda")
    assert time.perf_counter() - start < 60
    assert cuda.rank == cpu.rank == 4
    np.testing.assert_allclose(cuda.estimate, cpu.estimate, rtol=1e-6, atol=1e-8)
