"""Tensor-format factorizations (CP, Tucker, TT, TT-matrix) of a Linear weight: known answers in float64 on small
tensors, and quality against tensorly's decompositions at the same ranks."""

import math

import numpy as np
import pytest
import torch

from rankbench.kinds.tensor_formats import (
    CPLinear,
    TTLinear,
    TTMLinear,
    TuckerLinear,
    clip_tt_ranks,
    clip_tucker_ranks,
    factor_dims,
    fit_cp,
    fit_tt,
    fit_ttm,
    fit_tucker,
    mode_spectra,
    params_cp,
    params_tt,
    params_ttm,
    params_tucker,
    tt_spectra,
)

FORMATS = ("cp", "tucker", "tt", "ttm")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weight_like(out, inp, seed=0, decay=6.0):
    """A matrix with an exponentially decaying spectrum s_i = exp(-i / decay) and random singular vectors."""
    k = min(out, inp)
    U = torch.linalg.qr(gaussian(out, k, seed=seed))[0]
    V = torch.linalg.qr(gaussian(inp, k, seed=seed + 100))[0]
    s = torch.exp(-torch.arange(k, dtype=torch.float64) / decay)
    return (U * s) @ V.T


def rel_error(A, B):
    return float(torch.linalg.norm(A.detach() - B) / torch.linalg.norm(B))


def fit(name, W, out_dims, in_dims, ranks, bias=None):
    if name == "cp":
        return fit_cp(W, out_dims, in_dims, ranks, bias=bias)
    return {"tucker": fit_tucker, "tt": fit_tt, "ttm": fit_ttm}[name](W, out_dims, in_dims, ranks, bias=bias)


def full_ranks(name, out_dims, in_dims):
    n = math.prod(out_dims) * math.prod(in_dims)
    return {"tucker": len(out_dims) + len(in_dims), "tt": len(out_dims) + len(in_dims) - 1, "ttm": len(out_dims) - 1
            }[name] * [n]


# --- factor_dims ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, order, expected",
    [
        (768, 3, (12, 8, 8)),
        (768, 2, (32, 24)),
        (3072, 2, (64, 48)),
        (3072, 3, (16, 16, 12)),
        (50, 2, (10, 5)),
        (2, 2, (2, 1)),
        (7, 2, (7, 1)),
        (7, 3, (7, 1, 1)),
        (1, 2, (1, 1)),
        (12, 1, (12,)),
    ],
)
def test_factor_dims_examples(n, order, expected):
    dims = factor_dims(n, order)
    assert dims == expected and math.prod(dims) == n


def test_factor_dims_products_and_order():
    for n in range(1, 400):
        for order in (1, 2, 3, 4):
            dims = factor_dims(n, order)
            assert len(dims) == order and math.prod(dims) == n and list(dims) == sorted(dims, reverse=True)
    # balanced on powers of two: all factors within a factor 2 of each other
    for n in (256, 512, 1024, 4096):
        for order in (2, 3, 4):
            dims = factor_dims(n, order)
            assert max(dims) <= 2 * min(dims)
    with pytest.raises(ValueError):
        factor_dims(0, 2)
    with pytest.raises(ValueError):
        factor_dims(8, 0)


# --- exact reconstruction -----------------------------------------------------------------------------------------


DIMS = [((6, 4), (5, 6)), ((2, 3, 4), (3, 5, 2)), ((24,), (30,))]


@pytest.mark.parametrize("out_dims, in_dims", DIMS)
@pytest.mark.parametrize("name", ["tucker", "tt", "ttm"])
def test_full_rank_reconstructs_exactly(name, out_dims, in_dims):
    W = gaussian(24, 30)
    layer = fit(name, W, out_dims, in_dims, full_ranks(name, out_dims, in_dims))
    assert rel_error(layer.to_dense(), W) < 1e-10
    # ranks=None means full as well
    layer = {"tucker": fit_tucker, "tt": fit_tt, "ttm": fit_ttm}[name](W, out_dims, in_dims)
    assert rel_error(layer.to_dense(), W) < 1e-10


def planted_cp(dims, rank, seed):
    factors = [gaussian(d, rank, seed=seed + k) for k, d in enumerate(dims)]
    T = torch.zeros(dims, dtype=torch.float64)
    for r in range(rank):
        outer = factors[0][:, r]
        for A in factors[1:]:
            outer = outer[..., None] * A[:, r]
        T += outer
    return T


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_cp_als_recovers_a_planted_cp_tensor(seed, init):
    out_dims, in_dims, rank = (4, 3), (3, 5), 3
    W = planted_cp(out_dims + in_dims, rank, seed).reshape(12, 15)
    layer = fit_cp(W, out_dims, in_dims, rank, n_iter=1000, tol=1e-15, init=init, seed=seed)
    assert rel_error(layer.to_dense(), W) < 1e-6


def test_tt_svd_recovers_a_planted_tt_tensor_and_its_ranks():
    dims, ranks = (4, 3, 3, 5), (2, 3, 2)
    cores = [gaussian(r0, d, r1, seed=k) for k, (r0, d, r1) in enumerate(zip((1, *ranks), dims, (*ranks, 1)))]
    W = TTLinear(cores, dims[:2], dims[2:]).to_dense().detach()
    assert rel_error(fit_tt(W, dims[:2], dims[2:], ranks).to_dense(), W) < 1e-10
    spectra = tt_spectra(W, dims[:2], dims[2:], matrix_format=False)
    assert [int((s > 1e-10 * s[0]).sum()) for s in spectra] == list(ranks)


# --- parameter counts ---------------------------------------------------------------------------------------------


def test_parameter_counts_by_hand():
    out_dims, in_dims = (4, 3), (2, 5)
    assert params_cp(out_dims, in_dims, 3) == 3 * (4 + 3 + 2 + 5) + 3  # factors + lambda = 45
    assert params_tucker(out_dims, in_dims, (2, 3, 2, 4)) == 2 * 3 * 2 * 4 + (4 * 2 + 3 * 3 + 2 * 2 + 5 * 4)  # 89
    assert params_tt(out_dims, in_dims, (2, 3, 2)) == 1 * 4 * 2 + 2 * 3 * 3 + 3 * 2 * 2 + 2 * 5 * 1  # 48
    assert params_ttm(out_dims, in_dims, (3,)) == 1 * 4 * 2 * 3 + 3 * 3 * 5 * 1  # 69
    # clipped ranks: huge = full; the TT maximal ranks are the sequential unfolding ranks min(4, 30), min(12, 10), ...
    assert clip_tt_ranks((4, 3, 2, 5), (100, 100, 100)) == (4, 10, 5)
    assert params_tt(out_dims, in_dims, (100, 100, 100)) == 1 * 4 * 4 + 4 * 3 * 10 + 10 * 2 * 5 + 5 * 5 * 1
    assert clip_tucker_ranks((4, 3, 2, 5), (4, 1, 1, 5)) == (4, 1, 1, 4)
    assert params_tucker(out_dims, in_dims, (9, 9, 9, 9)) == 4 * 3 * 2 * 5 + (16 + 9 + 4 + 25)
    assert clip_tt_ranks((8, 15), (100,)) == (8,)
    with pytest.raises(ValueError):
        params_tt(out_dims, in_dims, (2, 3))
    with pytest.raises(ValueError):
        params_tucker(out_dims, in_dims, (2, 0, 2, 2))


@pytest.mark.parametrize("name, ranks", [("cp", 3), ("tucker", (2, 3, 2, 4)), ("tt", (2, 3, 2)), ("ttm", (3,)),
                                         ("tucker", (9, 9, 9, 9)), ("tt", (100, 100, 100)), ("ttm", (100,))])
def test_parameter_counts_equal_the_stored_numbers(name, ranks):
    out_dims, in_dims = (4, 3), (2, 5)
    W, bias = gaussian(12, 10), gaussian(12, seed=1)
    layer = fit(name, W, out_dims, in_dims, ranks, bias=bias)
    expected = {"cp": params_cp, "tucker": params_tucker, "tt": params_tt, "ttm": params_ttm}[name](
        out_dims, in_dims, ranks)
    stored = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    assert layer.weight_params == stored == expected
    assert layer.params == expected + 12
    assert fit(name, W, out_dims, in_dims, ranks).params == expected


# --- forward pass -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dims, in_dims", DIMS + [((3, 2, 4), (2, 5, 3))])
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_equals_the_dense_layer(name, out_dims, in_dims, with_bias):
    W, x = gaussian(24, 30), gaussian(2, 3, 30, seed=1)
    bias = gaussian(24, seed=2) if with_bias else None
    p, q = len(out_dims), len(in_dims)
    if name == "ttm" and p != q:
        pytest.skip("TT-matrix pairs output and input modes")
    ranks = {"cp": 4, "tucker": (p + q) * [2], "tt": (p + q - 1) * [3], "ttm": (p - 1) * [3]}[name]
    layer = fit(name, W, out_dims, in_dims, ranks, bias=bias)
    y = layer(x)
    dense = x @ layer.to_dense().T + (0 if bias is None else bias)
    assert y.shape == (2, 3, 24)
    assert (y - dense).abs().max() < 1e-10
    assert layer(x[0, 0]).shape == (24,)  # no leading dims


@pytest.mark.parametrize("name", FORMATS)
def test_both_forward_routes_agree_and_the_route_follows_the_cost_model(name, monkeypatch):
    """Reconstruct-then-GEMM and the format's contraction give the same output (float64: 1e-12 relative); with
    contraction weighted like one GEMM (cost 1) a layer whose contraction takes fewer FLOPs per row than the dense
    product keeps the contraction, and any layer takes the GEMM when the contraction costs more."""
    from rankbench.kinds.tensor_formats import TensorLinear

    W, x = gaussian(24, 30), gaussian(50, 30, seed=1)
    ranks = {"cp": 2, "tucker": [2, 2, 2, 2], "tt": [2, 2, 2], "ttm": [2]}[name]
    layer = fit(name, W, (4, 6), (5, 6), ranks)
    contraction = layer._apply_weight(x)
    reconstructed = x @ layer.to_dense().T
    assert ((contraction - reconstructed).abs().max() / reconstructed.abs().max()) < 1e-12
    counts = layer.flop_counts()
    assert counts["dense_per_row"] == 2 * 24 * 30 and counts["contraction_per_row"] > 0 and counts["reconstruct"] > 0
    monkeypatch.setattr(TensorLinear, "_plan", lambda self, rows: None)  # no planned route here
    monkeypatch.setattr(TensorLinear, "CONTRACTION_COST", 1.0)
    cheaper = counts["contraction_per_row"] * 50 < counts["reconstruct"] + 50 * counts["dense_per_row"]
    assert layer.route(50) == ("contraction" if cheaper else "reconstruct")
    monkeypatch.setattr(TensorLinear, "CONTRACTION_COST", 1e6)
    assert layer.route(50) == "reconstruct"
    torch.testing.assert_close(layer(x), reconstructed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FORMATS)
def test_layers_keep_dtype_pass_the_bias_through_and_train(name):
    W, bias = gaussian(12, 10).float(), gaussian(12, seed=1).float()
    layer = fit(name, W, (4, 3), (2, 5), {"cp": 3, "tucker": (2, 2, 2, 2), "tt": (2, 2, 2), "ttm": (2,)}[name],
                bias=bias)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert torch.equal(layer.bias, bias) and layer.bias.data_ptr() != bias.data_ptr()
    cls = {"cp": CPLinear, "tucker": TuckerLinear, "tt": TTLinear, "ttm": TTMLinear}[name]
    assert isinstance(layer, cls) and layer.in_features == 10 and layer.out_features == 12
    layer(gaussian(5, 10).float()).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bad_shapes_are_rejected():
    W = gaussian(12, 10)
    with pytest.raises(ValueError):
        fit_tt(W, (4, 4), (2, 5), (2, 2, 2))
    with pytest.raises(ValueError):
        fit_ttm(W, (4, 3), (10,), ())
    with pytest.raises(ValueError):
        fit_tucker(W, (4, 3), (2, 5), (2, 2, 2))
    with pytest.raises(ValueError):
        fit_cp(W, (4, 3), (2, 5), 0)


def test_default_dims_are_the_balanced_two_way_split():
    W = gaussian(12, 10)
    layer = fit_tt(W, ranks=(2, 2, 2))
    assert layer.out_dims == (4, 3) and layer.in_dims == (5, 2)


# --- spectra ------------------------------------------------------------------------------------------------------


def test_mode_spectra_are_the_unfolding_singular_values_and_bound_tucker():
    out_dims, in_dims = (6, 4), (5, 6)
    W = weight_like(24, 30)
    T = W.reshape(*out_dims, *in_dims)
    spectra = mode_spectra(W, out_dims, in_dims)
    assert [len(s) for s in spectra] == [6, 4, 5, 6]
    np.testing.assert_allclose(spectra[1], torch.linalg.svdvals(T.movedim(1, 0).reshape(4, -1)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(mode_spectra(W, (24,), (30,))[0], torch.linalg.svdvals(W).numpy(), rtol=1e-12)
    # HOSVD bound (De Lathauwer et al. 2000): ||T - T_hat||^2 <= sum_k sum_{i > r_k} s_i(T_(k))^2; HOOI only improves.
    ranks = (3, 2, 2, 3)
    bound = sum(float((s[r:] ** 2).sum()) for s, r in zip(spectra, ranks))
    error2 = float((fit_tucker(W, out_dims, in_dims, ranks).to_dense().detach() - W).square().sum())
    assert error2 <= bound * (1 + 1e-12)


@pytest.mark.parametrize("matrix_format", [False, True])
def test_tt_spectra_bound_the_tt_svd_error(matrix_format):
    out_dims, in_dims = (6, 4), (5, 6)
    W = weight_like(24, 30)
    spectra = tt_spectra(W, out_dims, in_dims, matrix_format=matrix_format)
    assert len(spectra) == (1 if matrix_format else 3)
    ranks = (5,) if matrix_format else (3, 6, 4)
    layer = (fit_ttm if matrix_format else fit_tt)(W, out_dims, in_dims, ranks)
    bound = sum(float((s[r:] ** 2).sum()) for s, r in zip(spectra, ranks))  # Oseledets 2011, Thm 2.2
    assert float((layer.to_dense().detach() - W).square().sum()) <= bound * (1 + 1e-12)
    if matrix_format:  # one split: TT-SVD is the truncated SVD of the permuted matrix, so the bound is attained
        assert float((layer.to_dense().detach() - W).square().sum()) == pytest.approx(bound, rel=1e-10)


# --- quality against tensorly ---------------------------------------------------------------------------------------

CASES = {  # name -> (W, out_dims, in_dims)
    "random-a": (gaussian(30, 30, seed=3), (6, 5), (5, 6)),
    "random-b": (gaussian(24, 30, seed=4), (2, 3, 4), (3, 5, 2)),
    "weight-like": (weight_like(48, 40, seed=5), (8, 6), (8, 5)),
}


def tensorly_modules():
    tl = pytest.importorskip("tensorly")
    return tl, pytest.importorskip("tensorly.decomposition")


def relative_np(A, T):
    return float(np.linalg.norm(A - T) / np.linalg.norm(T))


@pytest.mark.parametrize("case", sorted(CASES))
def test_tucker_is_as_good_as_tensorly(case):
    tl, dec = tensorly_modules()
    W, out_dims, in_dims = CASES[case]
    T = W.reshape(*out_dims, *in_dims).numpy()
    for ranks in ([3, 2, 4, 3, 2, 2][: T.ndim], [2] * T.ndim):
        ranks = [min(r, d) for r, d in zip(ranks, T.shape)]  # tensorly warns on (and clips) infeasible ranks
        reference = relative_np(tl.tucker_to_tensor(dec.tucker(T, rank=ranks, n_iter_max=100, init="svd")), T)
        mine = rel_error(fit_tucker(W, out_dims, in_dims, ranks, n_iter=100).to_dense(), W)
        assert mine <= reference * (1 + 1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tt_svd_matches_tensorly(case):
    tl, dec = tensorly_modules()
    W, out_dims, in_dims = CASES[case]
    T = W.reshape(*out_dims, *in_dims).numpy()
    for ranks in ([3] * (T.ndim - 1), [2, 5, 4, 3, 2][: T.ndim - 1]):
        reference = relative_np(tl.tt_to_tensor(dec.tensor_train(T, rank=[1, *ranks, 1])), T)
        mine = rel_error(fit_tt(W, out_dims, in_dims, ranks).to_dense(), W)
        assert mine <= reference * (1 + 1e-6)
        assert mine == pytest.approx(reference, rel=1e-8)  # TT-SVD is deterministic


@pytest.mark.parametrize("case", sorted(CASES))
def test_tt_matrix_matches_tensorly(case):
    tl, dec = tensorly_modules()
    if not hasattr(dec, "tensor_train_matrix"):
        pytest.skip("this tensorly has no tensor_train_matrix")
    W, out_dims, in_dims = CASES[case]
    T = W.reshape(*out_dims, *in_dims).numpy()  # tensorly's tensorized matrix: (o_1..o_d, i_1..i_d)
    d = len(out_dims)
    for ranks in ([4] * (d - 1), [7, 3][: d - 1]):
        reference = relative_np(tl.tt_matrix_to_tensor(dec.tensor_train_matrix(T, rank=[1, *ranks, 1])), T)
        mine = rel_error(fit_ttm(W, out_dims, in_dims, ranks).to_dense(), W)
        assert mine <= reference * (1 + 1e-6)
        assert mine == pytest.approx(reference, rel=1e-8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cp_als_is_as_good_as_tensorly_parafac(case):
    tl, dec = tensorly_modules()
    W, out_dims, in_dims = CASES[case]
    T = W.reshape(*out_dims, *in_dims).numpy()
    for rank in [r for r in (2, 4) if r <= min(T.shape)]:  # <= every dim: tensorly's SVD init has no random columns
        reference = relative_np(tl.cp_to_tensor(dec.parafac(T, rank, n_iter_max=150, init="svd", tol=1e-8)), T)
        mine = rel_error(fit_cp(W, out_dims, in_dims, rank, n_iter=150, tol=1e-9).to_dense(), W)
        assert mine <= reference * (1 + 1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cp_als_is_as_good_as_tensorly_parafac_on_seeds(seed):
    tl, dec = tensorly_modules()
    out_dims, in_dims = (5, 4), (4, 6)
    W = gaussian(20, 24, seed=10 + seed) + 3 * planted_cp((5, 4, 4, 6), 2, seed=20 + seed).reshape(20, 24)
    T = W.reshape(*out_dims, *in_dims).numpy()
    reference = relative_np(tl.cp_to_tensor(dec.parafac(T, 3, n_iter_max=150, init="svd", tol=1e-8)), T)
    mine = rel_error(fit_cp(W, out_dims, in_dims, 3, n_iter=150, tol=1e-9).to_dense(), W)
    assert mine <= reference * (1 + 1e-3)
