"""The ``elbow`` and ``farms`` selectors and the ``eora`` factorization against known answers: planted elbows, planted
power-law exponents and the allocation order they imply, exact recovery of a low-rank compression error, and the
eigenspace fit against an independent closed form (whitening by a Cholesky factor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rankbench.api import PARAM_RATIO, RankProblem, Site
from rankbench.kinds.compression import Decomposition, SiteStatistics, swapped
from rankbench_plugins.factorizations.eora import EoRA
from rankbench_plugins.selectors import elbow, farms
from rankbench_plugins.selectors._spectral import energy_fractions, energy_rank


# --------------------------------------------------------------------------------------------------------------
# elbow


@pytest.mark.parametrize("r", [1, 3, 7, 20])
def test_elbow_finds_a_planted_elbow(r):
    rng = np.random.default_rng(r)
    signal = np.linspace(10.0, 6.0, r)
    floor = 0.1 + 0.01 * rng.random(60 - r)
    s = np.sort(np.concatenate([signal, floor]))[::-1]
    assert elbow.elbow_rank(s) == r
    site = Site("w", (60, 80), singular_values=s)
    for eta in (0.0, 0.9):  # the signal holds > 99 % of the energy: the floor does not move the rank
        selector = elbow.ElbowSelector(elbow.ElbowSelector.Params(eta=eta))
        assert selector.select(RankProblem([site], None, None, 0)) == {"w": r}


def test_elbow_on_the_spectrum_of_a_planted_matrix():
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    V, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    W = U[:, :4] @ np.diag([8.0, 7.0, 6.0, 5.0]) @ V[:, :4].T + 0.01 * rng.standard_normal((50, 40))
    site = Site("w", W.shape, singular_values=np.linalg.svd(W, compute_uv=False))
    assert elbow.ElbowSelector().select(RankProblem([site], None, None, 0)) == {"w": 4}


def test_energy_floor_wins_where_the_elbow_is_too_early():
    s = np.array([10.0] + [3.0] * 19)  # one dominant value on a flat bulk: the elbow keeps 1
    assert elbow.elbow_rank(s) == 1
    expected = energy_rank(energy_fractions(s), 0.9)
    assert expected > 1
    assert elbow.elbow_energy_rank(s, 0.9) == expected


def test_elbow_of_a_flat_or_tiny_spectrum_keeps_everything():
    assert elbow.elbow_rank(np.ones(9)) == 9
    assert elbow.elbow_rank(np.array([3.0, 1.0])) == 2


# --------------------------------------------------------------------------------------------------------------
# farms


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_estimator_recovers_a_planted_power_law(alpha):
    u = (np.arange(20000) + 0.5) / 20000
    eigenvalues = (1.0 - u) ** (-1.0 / (alpha - 1.0))  # quantiles of p(λ) ∝ λ^-alpha on [1, inf)
    assert farms.hill_alpha(eigenvalues) == pytest.approx(alpha, rel=0.03)


def test_subsampling_removes_the_aspect_ratio_bias_of_random_matrices():
    rng = np.random.default_rng(0)
    wide, square = rng.standard_normal((200, 800)), rng.standard_normal((400, 400))
    raw = [farms.hill_alpha(np.linalg.svd(w, compute_uv=False) ** 2) for w in (wide, square)]
    fixed = [farms.hill_alpha(farms.farms_eigenvalues(w, 100, 2.0, 10)) for w in (wide, square)]
    assert abs(fixed[0] - fixed[1]) < 0.02 * fixed[0]  # same entries, same submatrix shape: same alpha
    assert abs(raw[0] - raw[1]) > 5 * abs(fixed[0] - fixed[1])  # the full ESDs differ by their aspect ratio


def test_heavier_tailed_entries_give_a_smaller_alpha():
    rng = np.random.default_rng(1)
    gaussian = rng.standard_normal((300, 600))
    heavy = rng.standard_t(1.5, size=(300, 600))  # Martin & Mahoney: entries with tail index mu < 2 -> heavy ESD
    a_gauss, a_heavy = (farms.hill_alpha(farms.farms_eigenvalues(w, 100, 2.0, 10)) for w in (gaussian, heavy))
    assert a_heavy == pytest.approx(1.0 + 1.5 / 2.0, abs=0.15)  # the ESD tail exponent 1 + mu/2 of mu = 1.5 entries
    assert a_heavy < a_gauss - 0.5


def test_window_grid_and_blocks():
    assert farms.window_starts(100, 100, 10) == [0]
    assert farms.window_starts(1000, 100, 10) == list(range(0, 901, 100))
    assert farms.block_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert farms.block_of("head") == "head"
    weights = farms.pruning_weights({"a": 2.0, "b": 3.0, "c": 4.0}, 0.3)
    assert weights == pytest.approx({"a": 0.7, "b": 1.0, "c": 1.3})


class WeightStatistics:
    """The part of ``CompressionStatistics`` that farms reads: each site's exact decomposition, and a store."""

    def __init__(self, weights):
        self.weights, self.stored = weights, {}

    def decomposition(self, site):
        U, s, Vh = torch.linalg.svd(torch.as_tensor(self.weights[site], dtype=torch.float64), full_matrices=False)
        return Decomposition(U, s, Vh)

    def store(self):
        return self.stored


def test_farms_allocation_removes_fewer_parameters_from_heavier_tailed_layers():
    rng = np.random.default_rng(2)
    weights = {
        "blocks.0.heavy": rng.standard_t(1.5, size=(120, 240)),
        "blocks.1.gauss": rng.standard_normal((120, 240)),
        "blocks.2.medium": rng.standard_t(3.0, size=(120, 240)),
    }
    sites = [Site(name, w.shape, singular_values=np.linalg.svd(w, compute_uv=False)) for name, w in weights.items()]
    problem = RankProblem(sites, 0.5, PARAM_RATIO, 0, stats=WeightStatistics(weights))
    selector = farms.FarmsSelector()
    alphas = selector.site_alphas(problem)
    assert alphas["blocks.0.heavy"] < alphas["blocks.2.medium"] < alphas["blocks.1.gauss"]
    ranks = selector.select(problem)
    assert ranks["blocks.0.heavy"] > ranks["blocks.2.medium"] > ranks["blocks.1.gauss"]
    kept = sum(site.params_at_rank(ranks[site.name]) for site in sites)
    assert kept <= 0.5 * problem.dense_params
    assert kept > 0.48 * problem.dense_params  # AlphaPruning's scale meets the budget, not far below it


def test_farms_meets_a_budget_where_fractions_clip():
    rng = np.random.default_rng(3)
    weights = {f"blocks.{i}.w": rng.standard_t(1.2 + i, size=(40, 80)) for i in range(4)}
    sites = [Site(name, w.shape, singular_values=np.linalg.svd(w, compute_uv=False)) for name, w in weights.items()]
    selector = farms.FarmsSelector(farms.FarmsSelector.Params(epsilon=0.9))
    for ratio in (0.1, 0.3, 0.6):
        problem = RankProblem(sites, ratio, PARAM_RATIO, 0, stats=WeightStatistics(weights))
        ranks = selector.select(problem)
        assert sum(site.params_at_rank(ranks[site.name]) for site in sites) <= ratio * problem.dense_params


# --------------------------------------------------------------------------------------------------------------
# eora


def eora(rank, **params):
    return EoRA(EoRA.Params(rank=rank, **params))


def planted_layer(out_features, in_features, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, 2, in_features, dtype=torch.float64)  # anisotropic inputs: the eigenspace matters
    X = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) * scales
    return W, X


def test_eora_recovers_the_dense_outputs_when_the_error_has_rank_at_most_r():
    W, X = planted_layer(12, 16, 200, 0)
    method = eora(4)
    decomposition = method.decompose(W, SiteStatistics())
    linear = nn.Linear(16, 12, bias=True, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(W)
    model = nn.Sequential(linear)
    dense = model(X).detach()
    stats = {"0": SiteStatistics(gram=X.T @ X)}
    # svd at rank 8 leaves an error of rank 12 - 8 = 4 = r
    with swapped(model, {"0": linear}, method, {"0": decomposition}, {"0": 8}, stats) as chosen, torch.no_grad():
        assert chosen == {"0": 8}
        assert model[0].rank == 12
        compressed = model(X)
    assert torch.allclose(compressed, dense, rtol=0, atol=1e-9 * dense.abs().max())
    assert method.params_at_rank((12, 16), 8) == 8 * 28 + 4 * 28
    assert method.params_at_rank((12, 16), 10) == 10 * 28 + 2 * 28  # r' = min(r, 12 - k)
    with swapped(model, {"0": linear}, eora(0), {"0": decomposition}, {"0": 8}, stats), torch.no_grad():
        assert model[0].rank == 8  # r = 0: the base alone


def test_eora_minimises_the_activation_weighted_error_among_rank_r_corrections():
    W, X = planted_layer(6, 10, 50, 1)
    G = X.T @ X
    method = eora(2)
    A, B = method.decompose(W, SiteStatistics()).factors(2)
    C, D = method.compensation(W, A, B, SiteStatistics(gram=G))
    residual = W - A @ B
    # independent closed form: ||(dW - M) X^T||_F = ||(dW - M) S||_F with G = S S^T (Cholesky), so the best rank-2 M
    # is [dW S]_2 S^-1 (Eckart-Young)
    S = torch.linalg.cholesky(G)
    U, sigma, Vh = torch.linalg.svd(residual @ S)
    best = (U[:, :2] * sigma[:2]) @ Vh[:2] @ torch.linalg.inv(S)
    assert torch.allclose(C @ D, best, atol=1e-10 * best.abs().max())

    def error(M):
        return float(torch.linalg.norm((residual - M) @ X.T) ** 2)

    assert error(C @ D) == pytest.approx(float((sigma[2:] ** 2).sum()), rel=1e-9)
    plain = torch.linalg.svd(residual)
    plain_fit = (plain.U[:, :2] * plain.S[:2]) @ plain.Vh[:2]  # the error's own SVD ignores the inputs
    assert error(C @ D) < error(plain_fit)
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):  # no nearby rank-2 matrix does better
        P = torch.randn(6, 2, generator=generator, dtype=torch.float64)
        R = torch.randn(2, 10, generator=generator, dtype=torch.float64)
        nearby = (C + 1e-3 * P * C.abs().max()) @ (D + 1e-3 * R * D.abs().max())
        assert error(nearby) >= error(C @ D)


def test_eora_with_fewer_tokens_than_inputs_is_finite_and_fits_the_calibration_outputs():
    W, X = planted_layer(8, 30, 5, 3)  # rank(X^T X) = 5 < 30
    method = eora(5)
    A, B = method.decompose(W, SiteStatistics()).factors(2)
    C, D = method.compensation(W, A, B, SiteStatistics(gram=X.T @ X))
    assert torch.isfinite(C).all() and torch.isfinite(D).all()
    target = W @ X.T
    # (dW - M) X^T has rank <= 5 = r: the calibration outputs are recovered up to the eigenvalue floor
    assert torch.linalg.norm((A @ B + C @ D) @ X.T - target) < 1e-6 * torch.linalg.norm(target)


def test_eora_resolves_its_base_through_the_registry():
    method = EoRA(EoRA.Params(base="svd-llm", base_params={"jitter": 1e-5}, rank=3))
    assert type(method.base).__name__ == "SVDLLM" and method.base.params.jitter == 1e-5
    assert method.needs == frozenset({"gram"})
    with pytest.raises(ValueError, match="no factorization"):
        EoRA(EoRA.Params(base="no-such-method"))
    with pytest.raises(ValueError, match="cannot compensate|not a matrix factorization"):
        EoRA(EoRA.Params(base="eora"))
