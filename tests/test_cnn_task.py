"""``cnn-classification`` (LeNet5) and tdlrt's Tucker convolution layer: the layer against the dense convolution and
the K-form gradients by autograd; the task trains above chance; a tdlrt cell records 4-mode ranks per conv site."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankbench.context import CellContext
from rankbench.kinds import cell_kind, run_cell
from rankbench.kinds import tensor_formats as tf
from rankbench_plugins.factorizations.cp import CP
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.tt import TT
from rankbench_plugins.factorizations.tucker import Tucker
from rankbench_plugins.selectors.energy import EnergySelector
from rankbench_plugins.selectors.uniform import UniformSelector
from rankbench_plugins.tasks.cnn_classification import CNNClassification, CNNParams
from rankbench_plugins.trainers._integrator import integrator_step
from rankbench_plugins.trainers.dlrt import DLRT
from rankbench_plugins.trainers.tdlrt import TDLRT, TuckerDLRTConv2d, tdlrt_layer

pytestmark = pytest.mark.usefixtures("single_torch_thread")
DT = torch.float64


def _conv(seed=0, out=6, inp=4, k=3, padding=1, stride=1):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(inp, out, k, padding=padding, stride=stride).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=DT))
    return conv, gen


def test_full_rank_tucker_conv_is_the_dense_convolution():
    conv, gen = _conv(stride=2)
    layer = tdlrt_layer(conv, Tucker(), TDLRT.Params(init_rank=6), gen)
    assert isinstance(layer, TuckerDLRTConv2d) and layer.ranks() == (6, 4, 3, 3)  # full: min(6, n_i)
    x = torch.randn(2, 4, 9, 9, generator=gen, dtype=DT)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.stored_params() == 6 * 4 * 3 * 3 + 6 * 6 + 4 * 4 + 3 * 3 + 3 * 3


def test_tucker_conv_k_gradients_match_the_k_forms():
    conv, gen = _conv()
    layer = tdlrt_layer(conv, Tucker(), TDLRT.Params(init_rank=2), gen)
    x = torch.randn(3, 4, 7, 7, generator=gen, dtype=DT)
    layer.begin_basis_step()
    (layer(x) ** 2).sum().backward()
    grads = layer.k_gradients()
    Qs, Ks = layer.k_forms()
    for i in range(4):
        # the K_i form: kernel = fold_i(Q_i^T) x_i K_i x_{j != i} U_j, differentiated by autograd
        K = Ks[i].detach().clone().requires_grad_(True)
        shape = list(layer.core.shape)
        rest = shape[:i] + shape[i + 1:]
        core_i = Qs[i].T.reshape(shape[i], *rest).movedim(0, i)
        mats = [K if j == i else U for j, U in enumerate(layer.factors)]
        kernel = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core_i, *mats)
        (F.conv2d(x, kernel, layer.bias, 1, 1) ** 2).sum().backward()
        torch.testing.assert_close(grads[i], K.grad)


def test_tucker_conv_step_without_truncation_is_the_projected_gradient_step():
    # one integrator step at tau 0: K - lr G x_i (U~_i U~_i^T), U~_i = orth([U_i R_i^T - lr grad_K_i, U_i]), with
    # G = dL/dK of the dense convolution by autograd and grad_K_i = Mat_i(G x_{j != i} U_j^T) Q_i
    conv, gen = _conv()
    layer, lr = tdlrt_layer(conv, Tucker(), TDLRT.Params(init_rank=2, rank_min=1), gen), 0.1
    x, y = torch.randn(5, 4, 6, 6, generator=gen, dtype=DT), torch.randn(5, 6, 6, 6, generator=gen, dtype=DT)
    core, factors, b = layer.core.clone(), [U.clone() for U in layer.factors], layer.bias.detach().clone()
    W = layer.kernel().detach().requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    loss = ((F.conv2d(x, W, bias, 1, 1) - y) ** 2).mean() + F.conv2d(x, W, bias, 1, 1).pow(3).mean()
    loss.backward()
    G, step = W.grad, W.grad
    for i, U in enumerate(factors):
        Q, R = torch.linalg.qr(core.movedim(i, 0).reshape(core.shape[i], -1).T)
        proj = G
        for j, V in enumerate(factors):
            if j != i:
                proj = torch.tensordot(proj, V, dims=([j], [0])).movedim(-1, j)
        K_new = U @ R.T - lr * proj.movedim(i, 0).reshape(G.shape[i], -1) @ Q
        Ua = torch.linalg.qr(torch.cat([K_new, U], dim=1))[0]
        step = torch.tensordot(step, Ua @ Ua.T, dims=([i], [0])).movedim(-1, i)
    expected = W.detach() - lr * step

    def objective():
        out = layer(x)
        return ((out - y) ** 2).mean() + out.pow(3).mean()

    integrator_step(nn.Sequential(layer), [layer], objective, lr=lr, tau=0.0)
    torch.testing.assert_close(layer.kernel(), expected)
    torch.testing.assert_close(layer.bias.detach(), b - lr * bias.grad)
    assert (layer.kernel() - (W.detach() - lr * G)).norm() > 1e-3  # the projection is not the identity


def test_tucker_conv_step_keeps_orthonormal_bases_and_adapts():
    conv, gen = _conv()
    layer = tdlrt_layer(conv, Tucker(), TDLRT.Params(init_rank=2, rank_min=1), gen)
    x, y = torch.randn(8, 4, 7, 7, generator=gen, dtype=DT), torch.randn(8, 6, 7, 7, generator=gen, dtype=DT)
    model = nn.Sequential(layer)
    before = layer.ranks()
    for _ in range(5):
        integrator_step(model, [layer], lambda: ((model(x) - y) ** 2).mean(), lr=0.5, tau=0.01)
    for U in layer.factors:
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=DT))
    assert layer.ranks() != before  # tau 0.01 on a random target asks for more than rank 2


def make(**params) -> CNNClassification:
    return CNNClassification(CNNParams.model_validate(
        {"dataset": "digits", "epochs": 2, "batch_size": 32, "lr": 3e-3, "latency_repeats": 1, **params}))


def make_ctx(tmp_path) -> CellContext:
    return CellContext(cell_id="c", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None, shared={},
                       cache_dir=tmp_path / "cnn-classification")


def metrics(ctx) -> dict:
    return {m["metric"]: m["value"] for m in ctx.metrics}


def test_lenet5_shape_and_sites(tmp_path):
    task = make()
    model = task.fresh_model(make_ctx(tmp_path))
    assert [tuple(m.weight.shape) for m in task.target_sites(model).values()] == [
        (6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    assert list(make(sites="linear").target_sites(model)) == ["fc1", "fc2", "fc3"]
    assert list(make(sites="conv").target_sites(model)) == ["conv1", "conv2"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert task.problem_kinds == {"training", "compression"}
    assert task.skip(DLRT(), SVD()) is None and task.skip(TDLRT(), Tucker()) is None
    from rankbench_plugins.trainers.bayes_tensor import BayesTensorTrainer

    assert "Linear sites only" in task.skip(BayesTensorTrainer(), Tucker())
    assert make(sites="linear").skip(BayesTensorTrainer(), Tucker()) is None
    # compression of conv kernels: tucker (Tucker-2) and cp only
    assert "does not factorise conv kernels" in task.skip(UniformSelector(), SVD())
    assert "does not factorise conv kernels" in make(sites="conv").skip(UniformSelector(), TT())
    assert task.skip(UniformSelector(), Tucker()) is None and task.skip(UniformSelector(), CP()) is None
    assert make(sites="linear").skip(UniformSelector(), SVD()) is None


def test_dense_lenet5_trains_well_above_chance(tmp_path):
    ctx = make_ctx(tmp_path)
    run_cell(make(), ctx)
    m = metrics(ctx)
    assert m["accuracy"] > 0.8, m  # chance 0.1; digits, 2 epochs


def test_tdlrt_cell_trains_conv_kernels_and_records_4_mode_ranks(tmp_path):
    ctx = make_ctx(tmp_path)
    # full starting ranks and lr 0.2: plain SGD (the integrator's step) on LeNet5 sits on the loss plateau for the
    # first epochs of this small set from the half-size start at lr 0.05 (dense SGD at 0.05 as well)
    task, method = make(), TDLRT(TDLRT.Params(tau=0.1, lr=0.2, init_rank=16))
    assert cell_kind(task, method, Tucker()) == "training"
    run_cell(task, ctx, method, Tucker())
    rows = {row["site"]: row for row in ctx.ranks_rows}
    assert set(rows) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    for site in ("conv1", "conv2"):
        ranks = rows[site]["rank_per_mode"].split("x")
        assert len(ranks) == 4, rows[site]
    assert rows["conv1"]["rank_per_mode"].split("x")[1] == "1"  # one input channel
    assert all(1 <= int(r) <= n for r, n in zip(rows["conv2"]["rank_per_mode"].split("x"), (16, 6, 5, 5)))
    assert any(row["curve"] == "rank:conv2" for row in ctx.curve_rows)
    assert metrics(ctx)["accuracy"] > 0.5, metrics(ctx)


@pytest.mark.slow
def test_dlrt_trains_the_linear_sites(tmp_path):
    ctx = make_ctx(tmp_path)
    task = make(sites="linear", epochs=1)
    run_cell(task, ctx, DLRT(DLRT.Params(tau=0.1)), SVD())
    assert {row["site"] for row in ctx.ranks_rows} == {"fc1", "fc2", "fc3"}
    assert metrics(ctx)["accuracy"] > 0.3


def test_linear_sites_compress_the_reference_network(tmp_path):
    task = make(sites="linear", epochs=1)
    ref = make_ctx(tmp_path)
    run_cell(task, ref)
    assert metrics(ref)["params"] == 120 * 400 + 84 * 120 + 10 * 84
    half = CellContext(cell_id="h", seed=0, task_seed=0, device="cpu", budget=0.5, budget_kind="param_ratio",
                       shared={}, cache_dir=tmp_path / "cnn-classification")
    assert cell_kind(task, UniformSelector(), SVD()) == "compression"
    run_cell(task, half, UniformSelector(), SVD())
    assert metrics(half)["param_ratio"] <= 0.5 and {row["site"] for row in half.ranks_rows} == {"fc1", "fc2", "fc3"}


def test_small_vgg_sites_and_a_tdlrt_cell(tmp_path):
    task = make(network="vgg", epochs=1, max_train=128, max_test=64)
    model = task.fresh_model(make_ctx(tmp_path))
    sites = task.target_sites(model)
    assert list(sites) == ["features.0", "features.1", "features.3", "features.4", "classifier.0", "classifier.2"]
    assert [tuple(sites[n].weight.shape) for n in ("features.1", "classifier.0")] == [(32, 32, 3, 3), (256, 3136)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    ctx = make_ctx(tmp_path)
    run_cell(task, ctx, TDLRT(TDLRT.Params(tau=0.1, lr=0.05)), Tucker())
    rows = {row["site"]: row["rank_per_mode"] for row in ctx.ranks_rows}
    assert len(rows["features.4"].split("x")) == 4


# ---------------------------------------------------------------------------------------------------------------------
# Tucker-2 / CP compression of conv kernels (compression kind)

GEOMETRIES = [dict(stride=1, padding=0), dict(stride=2, padding=1), dict(stride=(1, 2), padding=(2, 1), dilation=2)]


def _geometry_conv(seed, out, inp, k, **geometry):
    torch.manual_seed(seed)
    return nn.Conv2d(inp, out, k, **geometry).double()


def _planted_tucker2(seed, out, inp, k, r_out, r_in) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=gen, dtype=DT)
    U_out = torch.linalg.qr(torch.randn(out, r_out, generator=gen, dtype=DT))[0]
    U_in = torch.linalg.qr(torch.randn(inp, r_in, generator=gen, dtype=DT))[0]
    return torch.einsum("abyx,oa,ib->oiyx", core, U_out, U_in)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_full_rank_tucker2_conv_is_the_dense_convolution(geometry):
    conv = _geometry_conv(0, 8, 5, 3, **geometry)
    layer = tf.fit_tucker2_conv(conv, (8, 5))
    x = torch.randn(2, 5, 11, 12, dtype=DT)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer.to_dense(), conv.weight)
    assert layer.weight_params == tf.params_tucker2_conv(conv.weight.shape, (8, 5)) == 5 * 5 + 8 * 5 * 9 + 8 * 8


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_planted_tucker2_ranks_are_seen_and_reproduced(geometry):
    conv = _geometry_conv(1, 12, 7, 3, **geometry)
    with torch.no_grad():
        conv.weight.copy_(_planted_tucker2(1, 12, 7, 3, r_out=4, r_in=2))
    spectra, dims, caps = tf.tucker2_slots(conv.weight.detach())
    assert dims == [(12, 63), (7, 108)] and caps == [12, 7]
    for spectrum, rank in zip(spectra, (4, 2)):  # the unfoldings' numerical ranks are the planted ranks
        assert spectrum[rank - 1] > 1e-3 * spectrum[0] and spectrum[rank] < 1e-10 * spectrum[0]
    layer = tf.fit_tucker2_conv(conv, (4, 2))
    x = torch.randn(2, 7, 10, 10, dtype=DT)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.weight_params == 7 * 2 + 4 * 2 * 9 + 4 * 12 == tf.params_tucker2_conv(conv.weight.shape, (4, 2))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_planted_cp_kernel_is_reproduced_and_tensorly_agrees(geometry):
    import tensorly as tl
    from tensorly.decomposition import parafac

    gen = torch.Generator().manual_seed(2)
    R, (out, inp, k) = 3, (8, 6, 3)
    factors = [torch.randn(n, R, generator=gen, dtype=DT) for n in (out, inp, k, k)]
    kernel = torch.einsum("or,ir,yr,xr->oiyx", *factors)
    conv = _geometry_conv(2, out, inp, k, **geometry)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    layer = tf.fit_cp_conv(conv, R, n_iter=500, tol=1e-14)
    rel = float((layer.to_dense().detach() - kernel).norm() / kernel.norm())
    assert rel < 1e-6
    x = torch.randn(2, inp, 9, 10, dtype=DT)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5 * float(conv(x).abs().max()))
    assert layer.weight_params == R * (out + inp + k + k) == tf.params_cp_conv(kernel.shape, R)
    # an independent CP-ALS (tensorly) reaches the same (zero) error at the planted rank
    tl.set_backend("numpy")
    cp = parafac(kernel.numpy(), rank=R, n_iter_max=500, tol=1e-14, init="svd", random_state=0)
    rel_tl = np.linalg.norm(tl.cp_to_tensor(cp) - kernel.numpy()) / np.linalg.norm(kernel.numpy())
    assert rel_tl < 1e-4 and rel <= rel_tl + 1e-9


def test_conv_sites_compress_the_reference_lenet5_within_budget(tmp_path):
    task = make(epochs=1)
    ref = make_ctx(tmp_path)
    run_cell(task, ref)
    dense_params = 6 * 25 + 16 * 6 * 25 + 120 * 400 + 84 * 120 + 10 * 84
    assert metrics(ref)["params"] == dense_params
    for selector, factorization, ratio in ((EnergySelector(), Tucker(), 0.4), (UniformSelector(), CP(), 0.3)):
        ctx = CellContext(cell_id="c", seed=0, task_seed=0, device="cpu", budget=ratio, budget_kind="param_ratio",
                          shared=ref.shared, cache_dir=tmp_path / "cnn-classification")
        assert cell_kind(task, selector, factorization) == "compression"
        run_cell(task, ctx, selector, factorization)
        m = metrics(ctx)
        assert m["param_ratio"] <= ratio + 1e-9 and m["param_ratio"] > 0.5 * ratio, m
        rows = {row["site"]: row for row in ctx.ranks_rows}
        assert set(rows) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
        assert sum(int(r["params"]) for r in rows.values()) == m["params"]
        assert 0.0 <= m["accuracy"] <= 1.0


def test_dlrt_lenet5_is_the_reference_network_with_its_output_layer_dense(tmp_path):
    task = make(network="lenet5-dlrt")
    model = task.fresh_model(make_ctx(tmp_path))
    sites = task.target_sites(model)
    assert {n: tuple(m.weight.shape) for n, m in sites.items()} == {
        "conv1": (20, 1, 5, 5), "conv2": (50, 20, 5, 5), "fc1": (500, 800)}
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_dlrt_conv_at_full_rank_is_the_dense_convolution_and_its_k_gradients_are_autograds(stride, padding,
                                                                                              dilation):
    """A kernel as the matrix of its flattened filters: at full rank the layer is the dense conv, and the K-step
    pass hands K = U S the gradient G V of the dense kernel's autograd gradient G (as a matrix)."""
    from rankbench_plugins.trainers.dlrt import DLRTConv2d, dlrt_layer

    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation).double()
    layer = dlrt_layer(conv, DLRT.Params(rank_max=5, rank_min=1), gen)
    assert isinstance(layer, DLRTConv2d) and layer.ranks() == 5
    x = torch.randn(2, 3, 11, 9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    target = torch.randn_like(conv(x))
    ((conv(x) - target) ** 2).sum().backward()
    G = conv.weight.grad.reshape(5, -1)
    layer.begin_basis_step()
    ((layer(x) - target) ** 2).sum().backward()
    grad_K, grad_L = layer.kl_gradients()
    torch.testing.assert_close(grad_K, G @ layer.V)
    torch.testing.assert_close(grad_L, G.T @ layer.U)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_dlrt_cell_on_the_reference_lenet5_trains_its_conv_kernels(tmp_path, optimizer, lr):
    ctx = make_ctx(tmp_path)
    run_cell(make(network="lenet5-dlrt", epochs=2), ctx, DLRT(DLRT.Params(tau=0.15, lr=lr, optimizer=optimizer)), SVD())
    ranks = {row["site"]: row["rank"] for row in ctx.ranks_rows}
    assert set(ranks) == {"conv1", "conv2", "fc1"}
    assert ranks["conv1"] <= 10 and ranks["conv2"] <= 25 and ranks["fc1"] <= 250  # the reference's rmax: half
    m = metrics(ctx)
    assert m["accuracy"] > 0.6, m  # chance 0.1
    assert m["param_ratio"] < 0.5
