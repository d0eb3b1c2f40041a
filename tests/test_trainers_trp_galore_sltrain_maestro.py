"""Known-answer tests of the trainers ``trp``, ``galore``, ``sltrain`` and ``maestro`` (the methods: their module
docstrings and ``docs/algorithms.md``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankbench_plugins.trainers import galore, maestro, sltrain, trp
from rankbench_plugins.trainers._galore_layers import GaLoreSite
from rankbench_plugins.trainers._maestro_layers import MaestroLinear
from rankbench_plugins.trainers._trp_layers import TRPLayer


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def planted(singular_values: list[float], rows: int, cols: int, seed: int = 0):
    """(W = A diag(s) B^T, A, B) with orthonormal A (rows x k), B (cols x k)."""
    k = len(singular_values)
    A, B = orthonormal(rows, k, seed), orthonormal(cols, k, seed + 1)
    s = torch.tensor(singular_values, dtype=torch.float64)
    return (A * s) @ B.T, A, B


def linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def largest_principal_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The largest principal angle (radians) between span(X) and span(Y) (same number of columns)."""
    Qx, Qy = torch.linalg.qr(X)[0], torch.linalg.qr(Y)[0]
    cosines = torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


# -- trp --------------------------------------------------------------------------------------------------------------
ENERGIES = [0.5, 0.3, 0.15, 0.04, 0.01]  # s_i^2 of a planted spectrum (sum 1): cumulative 0.5, 0.8, 0.95, 0.99, 1


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.79, 2), (0.8, 2), (0.95, 3), (0.951, 4), (0.99, 4),
                                              (0.995, 5), (1.0, 5)])
def test_trp_energy_rank_is_the_smallest_rank_keeping_the_energy(energy, rank):
    s = torch.tensor(ENERGIES, dtype=torch.float64).sqrt()
    assert trp.energy_rank(s, energy) == rank


def test_trp_truncation_keeps_the_energy_with_the_best_approximation_of_the_smallest_rank():
    s = [math.sqrt(e) * 10 for e in ENERGIES]
    W, A, B = planted(s, 20, 12)
    layer = TRPLayer(linear_with(W))
    assert layer.ranks() == 12  # the full rank before any truncation
    trp.truncate(layer, 0.9)
    kept = layer.weight.detach()
    assert layer.ranks() == 3
    assert torch.linalg.matrix_rank(kept) == 3
    best = (A[:, :3] * torch.tensor(s[:3], dtype=torch.float64)) @ B[:, :3].T
    torch.testing.assert_close(kept, best, atol=1e-10, rtol=0)
    energy = (kept.norm() / W.norm()) ** 2
    assert energy >= 0.9 and sum(ENERGIES[:2]) < 0.9  # rank 3 keeps 95 %, rank 2 would keep only 80 %
    assert layer.stored_params() == 3 * (20 + 12)


def test_trp_truncates_a_kernel_as_the_matrix_of_its_flattened_filters():
    generator = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 6, 3).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64))
    layer = TRPLayer(conv)
    assert (layer.out_features, layer.in_features, layer.ranks()) == (6, 36, 6)
    U, s, Vh = trp.truncate(layer, 0.6)
    k = layer.ranks()
    assert k < 6 and torch.linalg.matrix_rank(conv.weight.detach().reshape(6, -1)) == k
    x = torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
    assert layer(x).shape == (2, 6, 3, 3)


def test_trp_nuclear_subgradient_is_u_v_transpose():
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(trp.nuclear_subgradient(W), U @ Vh)
    leaf = W.clone().requires_grad_(True)
    torch.linalg.matrix_norm(leaf, ord="nuc").backward()  # the gradient where W has full rank
    torch.testing.assert_close(trp.nuclear_subgradient(W), leaf.grad)


def test_trp_nuclear_subgradient_of_a_low_rank_matrix_uses_its_range_only():
    W, A, B = planted([3.0, 2.0, 1.0], 9, 6)
    G = trp.nuclear_subgradient(W)
    torch.testing.assert_close(G, A @ B.T)  # U_r V_r^T, r = 3
    assert float((G * W).sum()) == pytest.approx(6.0)  # <G, W> = ||W||_*
    assert float(torch.linalg.matrix_norm(G, ord=2)) == pytest.approx(1.0)


# -- galore -----------------------------------------------------------------------------------------------------------
# galore-torch adds eps to sqrt(v) before the bias correction, torch.optim.Adam after it: with a negligible eps
# the two updates are the same function of the gradients
EPS = 1e-14


def run_galore(weight: torch.Tensor, gradients: list[torch.Tensor], rank: int, gap: int = 1000):
    galore_torch = pytest.importorskip("galore_torch")
    del galore_torch
    site = GaLoreSite(linear_with(weight), rank)
    params = galore.GaLoreParams(update_proj_gap=gap, scale=1.0, eps=EPS)
    optimizer = galore.galore_optimizer([site], params, lr=0.01, weight_decay=0.0)
    for gradient in gradients:
        site.weight.grad = gradient.clone()
        optimizer.step()
    return site, optimizer


def run_adam(weight: torch.Tensor, gradients: list[torch.Tensor]) -> torch.Tensor:
    param = nn.Parameter(weight.clone())
    optimizer = torch.optim.Adam([param], lr=0.01, eps=EPS)
    for gradient in gradients:
        param.grad = gradient.clone()
        optimizer.step()
    return param.detach()


def gradient_stream(rows: int, cols: int, steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, cols, generator=generator, dtype=torch.float64) for _ in range(steps)]


def test_galore_at_full_rank_is_adam_when_the_subspace_is_the_coordinate_axes():
    # the first gradient has orthogonal columns of distinct norms: its right singular vectors are the coordinate
    # axes (up to order and sign), so the full-rank projection is a signed permutation, which Adam commutes with
    first = orthonormal(6, 4, 7) * torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    gradients = [first, *gradient_stream(6, 4, 5, seed=8)]
    W0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    site, _ = run_galore(W0, gradients, rank=4)
    torch.testing.assert_close(site.weight.detach(), run_adam(W0, gradients), atol=1e-6, rtol=0)


def test_galore_at_full_rank_is_adam_on_the_rotated_weight():
    gradients = gradient_stream(6, 4, 6, seed=10)
    W0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    site, optimizer = run_galore(W0, gradients, rank=4)
    Q = optimizer.state[site.weight]["projector"].ortho_matrix  # 4 x 4, m > n: the right projection
    torch.testing.assert_close(Q @ Q.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    rotated = run_adam(W0 @ Q.T, [g @ Q.T for g in gradients])  # Adam on W Q^T, fed the same gradients
    expected = W0 + (rotated - W0 @ Q.T) @ Q
    torch.testing.assert_close(site.weight.detach(), expected, atol=1e-9, rtol=0)
    # Adam in the original coordinates is a different update (Adam is not rotation invariant)
    assert float((site.weight.detach() - run_adam(W0, gradients)).abs().max()) > 1e-3


def test_galore_optimizer_state_is_the_projected_moments_and_the_projection():
    pytest.importorskip("galore_torch")
    site = GaLoreSite(nn.Linear(20, 12), rank=3)  # m = 12 < n = 20: left projection P (12 x 3), moments 3 x 20
    optimizer = galore.galore_optimizer([site], galore.GaLoreParams(), lr=1e-3, weight_decay=0.0)
    site.weight.grad = torch.randn(12, 20)
    optimizer.step()
    assert galore.optimizer_state_bytes(optimizer, [site.weight]) == (2 * 3 * 20 + 12 * 3) * 4
    assert (site.ranks(), site.stored_params()) == (3, 240)


def test_galore_rank_is_a_quarter_of_the_smaller_side_by_default():
    method = galore.GaLore()
    assert method.projection_rank(512, 784) == 128
    assert method.projection_rank(10, 512) == 3
    assert galore.GaLore(galore.GaLoreParams(rank=600)).projection_rank(512, 784) == 512


# -- sltrain ----------------------------------------------------------------------------------------------------------
def sltrain_layer(out_features=20, in_features=30, seed=0, **params):
    method = sltrain.SLTrain(sltrain.SLTrainParams(**params))
    return method.make_layer(nn.Linear(in_features, out_features), torch.Generator().manual_seed(seed))


def test_sltrain_parameter_count_is_rank_times_sides_plus_nonzeros():
    layer = sltrain_layer()
    rank, nonzeros = math.ceil(0.25 * 20), int(0.03 * 20 * 30)
    assert (layer.ranks(), layer.support.numel()) == (rank, nonzeros)
    trained = layer.A.numel() + layer.B.numel() + layer.values.numel()
    assert layer.stored_params() == rank * (20 + 30) + nonzeros == trained
    assert len(set(layer.support.tolist())) == nonzeros  # distinct positions
    assert layer.scaling == pytest.approx(32.0 / rank)


def test_sltrain_starts_from_the_sparse_part_and_its_support_never_changes():
    generator = torch.Generator().manual_seed(4)
    layer = sltrain_layer(rank=4, density=0.1)
    support = layer.support.clone()
    torch.testing.assert_close(layer.dense_weight(), layer.sparse())  # B = 0
    target = torch.randn(20, 30, generator=generator)
    x = torch.randn(64, 30, generator=generator)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    start = layer.values.detach().clone()
    for _ in range(30):
        optimizer.zero_grad()
        ((layer(x) - x @ target.T) ** 2).mean().backward()
        optimizer.step()
    assert torch.equal(layer.support, support)
    assert not torch.allclose(layer.values.detach(), start)  # the values train
    off_support = torch.ones(20 * 30, dtype=torch.bool)
    off_support[support] = False
    residual = (layer.dense_weight() - layer.scaling * layer.B @ layer.A).detach().reshape(-1)
    assert float(residual[off_support].abs().max()) == 0.0
    assert float(layer.B.detach().abs().max()) > 0  # the low-rank part left zero


# -- maestro ----------------------------------------------------------------------------------------------------------
PLANTED_SPECTRUM = [4.0, 3.0, 2.0, 1.2, 0.6, 0.3]


def fit_linear_map(ordered_dropout: bool, steps: int):
    """(U, V, A, B): a MaestroLinear from a random start fitted to y = W x (W = A diag(s) B^T, 8 x 6) by Adam on
    the squared loss over inputs with E[x x^T] = I, with LoD's rank sampling or at full rank throughout."""
    W, A, B = planted(PLANTED_SPECTRUM, 8, 6, seed=5)
    samples = 64
    X = orthonormal(samples, 6, 6) * math.sqrt(samples)  # empirical E[x x^T] = I exactly
    Y = X @ W.T
    torch.manual_seed(0)
    layer = MaestroLinear.from_linear(nn.Linear(6, 8, bias=False).double())
    sampler = maestro.PerLayerSampler([layer.kept if ordered_dropout else 0], torch.Generator().manual_seed(0))
    params = maestro.MaestroParams(group_lasso=0.0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        _, total = maestro.lod_loss([layer], sampler, lambda: ((layer(X) - Y) ** 2).sum(1).mean(), params)
        total.backward()
        optimizer.step()
    return layer.U.detach(), layer.V.detach(), A, B


def test_maestro_recovers_the_principal_subspaces_of_a_linear_map_in_order():
    s = PLANTED_SPECTRUM
    U, V, A, B = fit_linear_map(ordered_dropout=True, steps=3000)
    for k in range(1, 6):
        assert largest_principal_angle(U[:, :k], A[:, :k]) < 0.05, k
        assert largest_principal_angle(V[:, :k], B[:, :k]) < 0.05, k
        best = (A[:, :k] * torch.tensor(s[:k], dtype=torch.float64)) @ B[:, :k].T
        assert float(torch.linalg.norm(U[:, :k] @ V[:, :k].T - best) / torch.linalg.norm(best)) < 0.02, k


def test_maestro_without_ordered_dropout_fits_the_map_but_not_its_ordered_subspaces():
    U, V, A, B = fit_linear_map(ordered_dropout=False, steps=1000)
    W = (A * torch.tensor(PLANTED_SPECTRUM, dtype=torch.float64)) @ B.T
    assert float(torch.linalg.norm(U @ V.T - W) / torch.linalg.norm(W)) < 0.02  # the product is fitted ...
    assert largest_principal_angle(U[:, :1], A[:, :1]) > 0.2  # ... but its leading column is not W's


def test_maestro_group_lasso_and_importance_are_the_nested_tail_norms():
    generator = torch.Generator().manual_seed(2)
    U, V = torch.randn(5, 3, generator=generator), torch.randn(4, 3, generator=generator)
    layer = MaestroLinear(U, V, None)
    u_tails = [float(U[:, k:].norm()) for k in range(3)]
    v_tails = [float(V[:, k:].norm()) for k in range(3)]
    assert float(layer.group_lasso().detach()) == pytest.approx(sum(u_tails) + sum(v_tails), rel=1e-6)
    importance = layer.importance().tolist()
    assert importance == pytest.approx([u * v for u, v in zip(u_tails, v_tails)], rel=1e-6)
    layer.shrink(importance[1] * 0.999)  # keeps the prefix of components 0 and 1
    assert (layer.ranks(), layer.stored_params()) == (2, 2 * (5 + 4))
    x = torch.randn(7, 4, generator=generator)
    torch.testing.assert_close(layer(x), x @ (U[:, :2] @ V[:, :2].T).T)
    kept_lasso = sum(float(U[:, k:2].norm()) + float(V[:, k:2].norm()) for k in range(2))
    assert float(layer.group_lasso().detach()) == pytest.approx(kept_lasso, rel=1e-6)  # over the kept ones only
    layer.shrink(0.0)
    assert layer.ranks() == 2  # a component shrunk away never returns


def test_maestro_starts_from_the_site_weight_and_the_sampler_visits_every_layer_rank_pair_once_per_pass():
    linear = nn.Linear(6, 4)
    layer = MaestroLinear.from_linear(linear)
    torch.testing.assert_close(layer.to_dense(), linear.weight.detach(), atol=1e-6, rtol=0)
    sampler = maestro.PerLayerSampler([3, 2], torch.Generator().manual_seed(0))
    drawn = [next(sampler) for _ in range(5)]
    assert sorted(drawn) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]


# -- sltrain: the memory-efficient autograd function -----------------------------------------------------------------
def sltrain_float64_layer(out_features=7, in_features=9, rank=3, density=0.3, seed=2):
    from rankbench_plugins.trainers._sltrain_layers import SLTrainLinear

    generator = torch.Generator().manual_seed(seed)
    layer = SLTrainLinear(out_features, in_features, rank, density, 32.0, torch.randn(out_features, dtype=torch.float64),
                          generator, dtype=torch.float64)
    with torch.no_grad():  # B = 0 at initialisation would leave dL/dA = 0: start away from it
        layer.B.copy_(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    return layer


def test_sltrain_efficient_forward_passes_gradcheck_in_float64():
    from rankbench_plugins.trainers._sltrain_layers import SparsePlusLowRankLinear

    layer = sltrain_float64_layer()
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    inputs = (x, layer.B, layer.A, layer.values, layer.support, layer.scaling, layer.bias)
    assert torch.autograd.gradcheck(SparsePlusLowRankLinear.apply, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(6, 9), (2, 4, 9)])  # a batch of vectors, and of token sequences
def test_sltrain_efficient_forward_matches_the_dense_forward_and_its_gradients(shape):
    layer = sltrain_float64_layer()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    upstream = torch.randn(*shape[:-1], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for forward in (layer.forward, layer.forward_dense):
        y = forward(x)
        grads = torch.autograd.grad((y * upstream).sum(), [x, layer.B, layer.A, layer.values, layer.bias])
        results.append((y, *grads))
    for efficient, dense in zip(*results):
        torch.testing.assert_close(efficient, dense, rtol=1e-6, atol=1e-6)
    assert float(results[0][3].abs().max()) > 0  # the sparse values do receive a gradient


def saved_shapes(forward, x):
    """Shapes of every tensor autograd saves for the backward while ``forward(x)`` runs."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = forward(x)
    return shapes, y


def test_sltrain_efficient_forward_saves_no_out_by_in_tensor():
    layer = sltrain_float64_layer(out_features=7, in_features=9, rank=3, density=0.3)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    shapes, y = saved_shapes(layer.forward, x)
    assert sorted(shapes) == sorted([(5, 9), (7, 3), (3, 9), (layer.support.numel(),), (layer.support.numel(),)])
    assert all(sorted(t.shape) != [7, 9] for t in y.grad_fn.saved_tensors)  # neither W nor W^T
    dense_shapes, _ = saved_shapes(layer.forward_dense, x)
    assert (9, 7) in dense_shapes  # the naive forward keeps W (as F.linear's W^T): the check tells them apart
