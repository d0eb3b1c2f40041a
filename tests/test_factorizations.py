"""The SVD-family factorizations (svd, asvd, fwsvd, svd-llm): known answers on small random weights, in float64."""

import math

import pytest
import torch
from torch import nn

from rankbench.plugins import load_plugins
from rankbench_plugins.factorizations.asvd import ASVD
from rankbench_plugins.factorizations.fwsvd import FWSVD
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.svd_llm import SVDLLM, whitening_factor
from rankbench.kinds.compression import Decomposition, LowRankFactorization, LowRankLinear, SiteStatistics

OUT, IN, TOKENS = 7, 5, 40
ROWS = FWSVD(FWSVD.Params(axis="out"))  # FWSVD with one Fisher weight per output row (version 1's only axis)
ALL = {"svd": SVD, "asvd": ASVD, "fwsvd": FWSVD, "svd-llm": SVDLLM}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def calibration(out=OUT, inp=IN, tokens=TOKENS, seed=0):
    """A weight, calibration inputs X (tokens x in) with uneven channel scales, and every statistic."""
    g = generator(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, inp, dtype=torch.float64)
    fisher = torch.rand(out, generator=g, dtype=torch.float64) * 5 + 0.1
    fisher_cols = torch.rand(inp, generator=g, dtype=torch.float64) * 5 + 0.1
    stats = SiteStatistics(gram=X.T @ X, input_abs_mean=X.abs().mean(0), fisher_rows=fisher, fisher_cols=fisher_cols,
                           tokens=tokens)
    return W, X, stats


def rank_k(d: Decomposition, k: int) -> torch.Tensor:
    A, B = d.factors(k)
    return A @ B


def best_rank_k(M: torch.Tensor, k: int) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vh[:k]


def test_plugins_are_registered_with_their_names_and_needs():
    registry = load_plugins()
    for name, cls in ALL.items():
        info = registry.get("factorization", name)
        assert info.cls is cls and issubclass(cls, LowRankFactorization)
        assert cls.version == ("2" if name == "fwsvd" else "1") and cls.description
    assert SVD.needs == frozenset()
    assert ASVD.needs == {"input_abs_mean"}
    assert FWSVD.needs == FWSVD().needs == {"fisher_cols"}  # the default axis: input channels
    assert ROWS.needs == {"fisher_rows"} and FWSVD.needs == {"fisher_cols"}
    assert SVDLLM.needs == {"gram"}
    assert ASVD().params.alpha == 0.5 and ASVD().params.eps == 1e-6


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT)])
def test_full_rank_reproduces_the_dense_layer(name, shape):
    out, inp = shape
    W, _, stats = calibration(out, inp)
    d = ALL[name]().decompose(W, stats)
    p = min(out, inp)
    assert d.left.shape == (out, p) and d.s.shape == (p,) and d.right.shape == (p, inp)
    assert torch.all(d.s[:-1] >= d.s[1:]) and torch.all(d.s >= 0)
    torch.testing.assert_close(d.matrix(), W, rtol=1e-10, atol=1e-10)

    dense = nn.Linear(inp, out, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(W)
    low = LowRankLinear(*d.factors(p), dense.bias.detach())
    x = torch.randn(11, inp, generator=generator(3), dtype=torch.float64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ALL))
def test_factors_at_every_rank_are_the_truncation(name):
    W, _, stats = calibration()
    d = ALL[name]().decompose(W, stats)
    for k in range(1, IN + 1):
        A, B = d.factors(k)
        assert A.shape == (OUT, k) and B.shape == (k, IN)
        torch.testing.assert_close(A @ B, (d.left[:, :k] * d.s[:k]) @ d.right[:k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_counts(name, bias):
    factorization = ALL[name]()
    W, _, stats = calibration()
    d = factorization.decompose(W, stats)
    b = torch.zeros(OUT, dtype=torch.float64) if bias else None
    for k in (1, 3, IN):
        assert factorization.params_at_rank((OUT, IN), k) == k * (OUT + IN)
        low = LowRankLinear(*d.factors(k), b)
        weights = sum(m.weight.numel() for m in (low.down, low.up))
        assert weights == k * (OUT + IN)
        assert sum(p.numel() for p in low.parameters()) == k * (OUT + IN) + (OUT if bias else 0)
        assert low.rank == k and low.in_features == IN and low.out_features == OUT


def test_svd_truncation_error_is_eckart_young():
    W, _, stats = calibration(9, 6)
    d = SVD().decompose(W, stats)
    torch.testing.assert_close(d.s, torch.linalg.svdvals(W))
    for k in range(1, 7):
        error = torch.linalg.norm(W - rank_k(d, k))
        assert math.isclose(float(error), float(d.s[k:].square().sum().sqrt()), rel_tol=1e-9, abs_tol=1e-12)
        torch.testing.assert_close(rank_k(d, k), best_rank_k(W, k))


def test_svd_llm_truncation_loss_equals_dropped_singular_values():
    """SVD-LLM's theorem: ||(W - W_k) Xᵀ||_F² = Σ_{i>k} d_i², d = singular values of W S, G = XᵀX = S Sᵀ."""
    W, X, stats = calibration(8, 6, tokens=50)
    d = SVDLLM().decompose(W, stats)
    S = torch.linalg.cholesky(X.T @ X)
    torch.testing.assert_close(d.s, torch.linalg.svdvals(W @ S))
    for k in range(1, 7):
        loss = torch.linalg.norm((W - rank_k(d, k)) @ X.T) ** 2
        assert math.isclose(float(loss), float(d.s[k:].square().sum()), rel_tol=1e-8, abs_tol=1e-9)
        # and it is the best rank-k output error: plain SVD's W_k does no better on the data
        svd_loss = torch.linalg.norm((W - best_rank_k(W, k)) @ X.T) ** 2
        assert float(loss) <= float(svd_loss) * (1 + 1e-10) + 1e-20


def test_svd_llm_fallback_on_a_rank_deficient_gram():
    g = generator(5)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    X = torch.randn(3, 8, generator=g, dtype=torch.float64)  # 3 tokens, 8 channels: G has rank 3
    X[:, 0] = 0.0  # and a dead channel
    G = X.T @ X
    assert torch.linalg.cholesky_ex(G).info != 0
    S, shift = whitening_factor(G)
    assert shift > 0
    torch.testing.assert_close(S @ S.T, G + shift * torch.eye(8, dtype=torch.float64))
    d = SVDLLM().decompose(W, SiteStatistics(gram=G))
    assert torch.isfinite(d.left).all() and torch.isfinite(d.right).all()
    torch.testing.assert_close(d.matrix(), W, rtol=1e-8, atol=1e-8)
    # the shifted whitening still honours the theorem on the data it saw: dropping components beyond the
    # data's rank (3) costs (almost) nothing on X
    assert float(torch.linalg.norm((W - rank_k(d, 3)) @ X.T)) < 1e-4 * float(torch.linalg.norm(W @ X.T))
    # the margin is relative to trace(G)/n, so rescaling G leaves every W_k unchanged
    scaled = SVDLLM().decompose(W, SiteStatistics(gram=G * 1e8))
    for k in (1, 3, 5):
        torch.testing.assert_close(rank_k(scaled, k), rank_k(d, k), rtol=1e-6, atol=1e-8)
    # an all-zero Gram (a site no input reaches) falls back to plain SVD
    zero = SVDLLM().decompose(W, SiteStatistics(gram=torch.zeros(8, 8, dtype=torch.float64)))
    torch.testing.assert_close(rank_k(zero, 2), best_rank_k(W, 2))
    assert zero.note.startswith("zero Gram") and d.note.startswith("Gram not positive definite")
    assert scaled.note and SVDLLM().decompose(W, SiteStatistics(gram=G + torch.eye(8, dtype=torch.float64))).note == ""


def test_svd_llm_whitening_needs_no_shift_for_a_positive_definite_gram():
    _, X, _ = calibration()
    S, shift = whitening_factor(X.T @ X)
    assert shift == 0.0
    torch.testing.assert_close(S, torch.linalg.cholesky(X.T @ X))


def test_asvd_with_constant_scales_equals_svd():
    W, _, _ = calibration()
    stats = SiteStatistics(input_abs_mean=torch.full((IN,), 2.5, dtype=torch.float64))
    a, s = ASVD().decompose(W, stats), SVD().decompose(W, stats)
    scale = 2.5**0.5 + 1e-6
    torch.testing.assert_close(a.s, s.s * scale)
    for k in range(1, IN + 1):
        torch.testing.assert_close(rank_k(a, k), rank_k(s, k), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis,size", [("out", OUT), ("in", IN)])
def test_fwsvd_with_constant_fisher_equals_svd(axis, size):
    W, _, _ = calibration()
    stats = SiteStatistics(**{FWSVD_STAT[axis]: torch.full((size,), 4.0, dtype=torch.float64)})
    f, s = FWSVD(FWSVD.Params(axis=axis)).decompose(W, stats), SVD().decompose(W, stats)
    for k in range(1, IN + 1):
        torch.testing.assert_close(rank_k(f, k), rank_k(s, k), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.s, s.s * math.sqrt(4.0 * (1 + 1e-6)))


FWSVD_STAT = {"out": "fisher_rows", "in": "fisher_cols"}


def test_fwsvd_minimises_the_fisher_weighted_error():
    W, _, stats = calibration(9, 6)
    fisher = stats.fisher_rows
    w = (fisher + 1e-6 * fisher.max()).sqrt()  # the documented floor
    f, s = ROWS.decompose(W, stats), SVD().decompose(W, stats)
    torch.testing.assert_close(f.s, torch.linalg.svdvals(w[:, None] * W))
    g = generator(7)
    for k in range(1, 6):
        Wk = rank_k(f, k)
        ours = torch.linalg.norm(w[:, None] * (W - Wk))
        # independent: the weighted optimum computed here from scratch
        optimum = best_rank_k(w[:, None] * W, k) / w[:, None]
        assert math.isclose(float(ours), float(torch.linalg.norm(w[:, None] * (W - optimum))), rel_tol=1e-9)
        assert math.isclose(float(ours), float(f.s[k:].square().sum().sqrt()), rel_tol=1e-9)
        # plain SVD (optimal in the unweighted norm) is no better in the weighted norm, and no random rank-k is
        assert float(torch.linalg.norm(w[:, None] * (W - rank_k(s, k)))) >= float(ours) * (1 - 1e-9)
        for _ in range(5):
            other = Wk + 1e-2 * torch.randn(9, k, generator=g, dtype=torch.float64) @ torch.randn(
                k, 6, generator=g, dtype=torch.float64
            )
            other = best_rank_k(other, k)
            assert float(torch.linalg.norm(w[:, None] * (W - other))) >= float(ours) * (1 - 1e-9)
        # while in the plain Frobenius norm it is no better than SVD (it optimises a different objective)
        assert float(torch.linalg.norm(W - Wk)) >= float(torch.linalg.norm(W - rank_k(s, k))) * (1 - 1e-9)


def test_fwsvd_input_axis_is_the_column_weighted_svd():
    """axis in (the default): W_k minimises ||(W - X) diag(sqrt(Ihat))||_F over rank-k X, Ihat the Fisher column sums;
    checked against a weighted SVD computed here directly, in numpy."""
    import numpy as np

    W, _, stats = calibration(9, 6)
    Wn, fisher = W.numpy(), stats.fisher_cols.numpy()
    w = np.sqrt(fisher + 1e-6 * fisher.max())
    U, s, Vt = np.linalg.svd(Wn * w[None, :], full_matrices=False)
    f = FWSVD().decompose(W, stats)
    assert FWSVD().params.axis == "in"
    np.testing.assert_allclose(f.s.numpy(), s, rtol=1e-12)
    g = generator(8)
    for k in range(1, 6):
        direct = (U[:, :k] * s[:k]) @ Vt[:k] / w[None, :]
        np.testing.assert_allclose(rank_k(f, k).numpy(), direct, rtol=1e-9, atol=1e-12)
        ours = np.linalg.norm((Wn - direct) * w[None, :])
        assert math.isclose(ours, float(np.sqrt((s[k:] ** 2).sum())), rel_tol=1e-9)
        for _ in range(5):  # no nearby rank-k matrix is better in the column-weighted norm
            other = best_rank_k(torch.from_numpy(direct) + 1e-2 * torch.randn(9, 6, generator=g, dtype=torch.float64), k)
            assert np.linalg.norm((Wn - other.numpy()) * w[None, :]) >= ours * (1 - 1e-9)
    # the two axes differ in general, and the input axis ignores the row sums (and vice versa)
    assert not torch.allclose(rank_k(f, 2), rank_k(ROWS.decompose(W, stats), 2))
    no_rows = SiteStatistics(fisher_cols=stats.fisher_cols)
    torch.testing.assert_close(rank_k(FWSVD().decompose(W, no_rows), 2), rank_k(f, 2))
    with pytest.raises(ValueError, match="fisher_rows"):
        ROWS.decompose(W, no_rows)


@pytest.mark.parametrize("axis,size", [("out", OUT), ("in", IN)])
def test_fwsvd_guards_zero_fisher_rows(axis, size):
    W, _, _ = calibration()
    fwsvd = FWSVD(FWSVD.Params(axis=axis))
    kind = FWSVD_STAT[axis]
    fisher = torch.rand(size, generator=generator(2), dtype=torch.float64) + 0.5
    fisher[2] = 0.0
    d = fwsvd.decompose(W, SiteStatistics(**{kind: fisher}))
    assert torch.isfinite(d.left).all() and torch.isfinite(d.right).all()
    torch.testing.assert_close(d.matrix(), W, rtol=1e-9, atol=1e-9)
    weights = fwsvd.channel_weights(SiteStatistics(**{kind: fisher}), W)
    assert math.isclose(float(weights[2]), math.sqrt(1e-6 * float(fisher.max())), rel_tol=1e-12)
    # no gradient at all: plain SVD
    none = fwsvd.decompose(W, SiteStatistics(**{kind: torch.zeros(size, dtype=torch.float64)}))
    torch.testing.assert_close(rank_k(none, 2), best_rank_k(W, 2))
    assert none.note.startswith("zero Fisher") and d.note == ""


def test_asvd_minimises_the_activation_scaled_error():
    W, _, stats = calibration(9, 6)
    S = stats.input_abs_mean**0.5 + 1e-6
    a, s = ASVD().decompose(W, stats), SVD().decompose(W, stats)
    torch.testing.assert_close(a.s, torch.linalg.svdvals(W * S))
    for k in range(1, 6):
        Wk = rank_k(a, k)
        ours = torch.linalg.norm((W - Wk) * S)
        optimum = best_rank_k(W * S, k) / S
        assert math.isclose(float(ours), float(torch.linalg.norm((W - optimum) * S)), rel_tol=1e-9)
        assert math.isclose(float(ours), float(a.s[k:].square().sum().sqrt()), rel_tol=1e-9)
        assert float(torch.linalg.norm((W - rank_k(s, k)) * S)) >= float(ours) * (1 - 1e-9)


def test_asvd_alpha_changes_the_scaling():
    W, _, stats = calibration()
    one = ASVD(ASVD.Params(alpha=1.0)).decompose(W, stats)
    torch.testing.assert_close(one.s, torch.linalg.svdvals(W * (stats.input_abs_mean + 1e-6)))
    zero = ASVD(ASVD.Params(alpha=0.0)).decompose(W, stats)  # every scale 1 + eps: plain SVD
    torch.testing.assert_close(rank_k(zero, 2), best_rank_k(W, 2))


@pytest.mark.parametrize("name,missing", [("asvd", "input_abs_mean"), ("fwsvd", "fisher_cols"), ("svd-llm", "gram")])
def test_missing_statistics_are_a_clear_error(name, missing):
    W, _, _ = calibration()
    with pytest.raises(ValueError, match=missing):
        ALL[name]().decompose(W, SiteStatistics())


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        ASVD.Params(alpha=-1.0)
    with pytest.raises(ValueError):
        FWSVD.Params(rel_floor=0.0)
    with pytest.raises(ValueError):
        FWSVD.Params(axis="rows")
    with pytest.raises(ValueError):
        SVDLLM.Params(typo=1.0)
