"""dlrt / tdlrt (rank-adaptive integrators of the ``training`` kind): each check has an answer computed independently
of the layer code -- from the dense weight's autograd gradient, from hand-computed singular tails, or a planted rank."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankbench.context import CellContext
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.tucker import Tucker
from rankbench.kinds.training import TrainingSettings, TrainingTask, run_training
from rankbench.kinds.layers import tail_rank
from rankbench_plugins.trainers._integrator import integrator_step
from rankbench_plugins.trainers.dlrt import DLRT, DLRTLinear, dlrt_layer
from rankbench_plugins.trainers.tdlrt import TDLRT, TuckerDLRTLinear, tdlrt_layer, tucker_apply

DT = torch.float64


def _orthonormal(n, r, gen):
    return torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=DT))[0]


def _dlrt(out=8, inp=6, r=2, seed=0, rank_max=100):
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(r, r, generator=gen, dtype=DT)
    bias = torch.randn(out, generator=gen, dtype=DT)
    return DLRTLinear(_orthonormal(out, r, gen), S, _orthonormal(inp, r, gen), bias, rank_min=1, rank_max=rank_max)


def _batch(inp, out, n=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, inp, generator=gen, dtype=DT), torch.randn(n, out, generator=gen, dtype=DT)


def _loss(pred, y):
    return ((pred - y) ** 2).sum(dim=-1).mean() + pred.pow(3).mean()  # non-quadratic: G depends on W non-trivially


def _eye(n):
    return torch.eye(n, dtype=DT)


# -- dlrt -------------------------------------------------------------------------------------------------------------


def test_dlrt_k_and_l_gradients_from_one_backward_match_the_k_and_l_forms():
    layer = _dlrt()
    x, y = _batch(6, 8)
    layer.begin_basis_step()
    _loss(layer(x), y).backward()
    grad_K, grad_L = layer.kl_gradients()
    U, S, V, b = layer.U, layer.S, layer.V, layer.bias.detach()
    K = (U @ S).requires_grad_(True)  # K-form: x V K^T + b
    _loss(x @ V @ K.T + b, y).backward()
    L = (V @ S.T).requires_grad_(True)  # L-form: x L U^T + b
    _loss(x @ L @ U.T + b, y).backward()
    torch.testing.assert_close(grad_K, K.grad)
    torch.testing.assert_close(grad_L, L.grad)
    # and both are the contracted dense gradient: G V, G^T U
    W = (U @ S @ V.T).requires_grad_(True)
    _loss(x @ W.T + b, y).backward()
    torch.testing.assert_close(grad_K, W.grad @ V)
    torch.testing.assert_close(grad_L, W.grad.T @ U)


def test_dlrt_step_without_truncation_is_the_projected_gradient_step():
    layer, lr = _dlrt(), 0.1
    x, y = _batch(6, 8)
    U, S, V, b = layer.U.clone(), layer.S.clone(), layer.V.clone(), layer.bias.detach().clone()
    W = (U @ S @ V.T).requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    _loss(x @ W.T + bias, y).backward()
    G = W.grad
    Qu = torch.linalg.qr(torch.cat([U @ S - lr * G @ V, U], dim=1))[0]
    Qv = torch.linalg.qr(torch.cat([V @ S.T - lr * G.T @ U, V], dim=1))[0]
    expected = W.detach() - lr * Qu @ Qu.T @ G @ Qv @ Qv.T

    integrator_step(layer, [layer], lambda: _loss(layer(x), y), lr=lr, tau=0.0)
    assert layer.ranks() == 4  # 2r, nothing truncated
    torch.testing.assert_close(layer.to_dense(), expected)
    torch.testing.assert_close(layer.bias.detach(), b - lr * bias.grad)
    # the step differs from the unprojected one (the check is not vacuous)
    assert (layer.to_dense() - (W.detach() - lr * G)).norm() > 1e-3


def test_network_parameters_take_one_task_step_with_the_gradient_at_the_start_weights():
    # pass 2 runs at U_hat S_hat V_hat^T = W exactly, so the other parameters see the dense gradient at the start
    torch.manual_seed(0)
    head = nn.Linear(8, 3).double()
    layer = _dlrt()
    model = nn.Sequential(layer, nn.Tanh(), head)
    x, y = _batch(6, 3)
    W0, b0 = layer.to_dense().clone(), layer.bias.detach().clone()
    reference = nn.Sequential(nn.Linear(6, 8).double(), nn.Tanh(), nn.Linear(8, 3).double())
    with torch.no_grad():
        reference[0].weight.copy_(W0)
        reference[0].bias.copy_(b0)
        reference[2].load_state_dict(head.state_dict())
    _loss(reference(x), y).backward()
    expected = head.weight.detach() - 0.3 * reference[2].weight.grad
    optimizer = torch.optim.SGD(head.parameters(), lr=0.3)
    integrator_step(model, [layer], lambda: _loss(model(x), y), lr=0.1, tau=0.0, optimizer=optimizer)
    torch.testing.assert_close(head.weight.detach(), expected)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.1 * reference[0].bias.grad)


def test_dlrt_truncation_rank_follows_the_tail_rule():
    d = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125], dtype=DT)
    # ||d|| = 4.6183; tails ||d[j:]|| = 4.618, 2.308, 1.152, 0.573, 0.280, 0.125, 0
    expected = {0.6: 1, 0.3: 2, 0.2: 3, 0.1: 4, 0.05: 5, 0.01: 6, 0.0: 6}
    for tau, r in expected.items():
        assert tail_rank(d, tau) == r, tau
    gen = torch.Generator().manual_seed(3)
    P, Q = _orthonormal(6, 6, gen), _orthonormal(6, 6, gen)

    def truncated(tau, rank_min=2, rank_max=100):
        layer = DLRTLinear(_orthonormal(12, 6, gen), P @ torch.diag(d) @ Q.T, _orthonormal(10, 6, gen), None,
                           rank_min=rank_min, rank_max=rank_max)
        before = layer.to_dense()
        layer.truncate(tau)
        s_kept = torch.linalg.svdvals(layer.to_dense())[: layer.ranks()]
        torch.testing.assert_close(s_kept, d[: layer.ranks()])  # the leading singular triplets are kept
        torch.testing.assert_close(layer.U.T @ layer.U, _eye(layer.ranks()))
        err = (before - layer.to_dense()).norm()
        torch.testing.assert_close(err, d[layer.ranks():].norm())
        return layer.ranks()

    assert [truncated(t) for t in (0.3, 0.2, 0.1, 0.05, 0.01, 0.0)] == [2, 3, 4, 5, 6, 6]
    assert truncated(0.6) == 2  # rule says 1, rank_min 2
    assert truncated(0.6, rank_min=1) == 1
    assert truncated(0.01, rank_max=4) == 4
    assert truncated(0.2, rank_max=100) == 3
    # the default cap: min(12, 10) // 2 = 5
    assert truncated(0.0, rank_max=None) == 5


def test_dlrt_bases_stay_orthonormal_and_forward_is_dense():
    layer = _dlrt(out=12, inp=9, r=3, rank_max=None)
    for step in range(5):
        x, y = _batch(9, 12, seed=10 + step)
        integrator_step(layer, [layer], lambda x=x, y=y: _loss(layer(x), y), lr=0.05, tau=0.05)
        r = layer.ranks()
        assert 1 <= r <= 4  # cap min(12, 9) // 2
        torch.testing.assert_close(layer.U.T @ layer.U, _eye(r))
        torch.testing.assert_close(layer.V.T @ layer.V, _eye(r))
        assert layer.S.shape == (r, r)
        x3 = torch.randn(2, 5, 9, dtype=DT)
        torch.testing.assert_close(layer(x3), x3 @ layer.to_dense().T + layer.bias)
    assert layer.stored_params() == layer.ranks() * (12 + 9)


def test_dlrt_dense_init_is_the_truncated_svd_of_the_site():
    linear = nn.Linear(10, 8).double()
    layer = dlrt_layer(linear, DLRT.Params(init_rank=3), torch.Generator())
    U, s, Vh = torch.linalg.svd(linear.weight.detach())
    torch.testing.assert_close(layer.to_dense(), U[:, :3] @ torch.diag(s[:3]) @ Vh[:3])
    assert layer.ranks() == 3
    torch.testing.assert_close(layer.bias.detach(), linear.bias.detach())
    random = dlrt_layer(linear, DLRT.Params(init="random"), torch.Generator().manual_seed(0))
    assert random.ranks() == 4  # starts at the cap min(8, 10) // 2
    torch.testing.assert_close(random.U.T @ random.U, _eye(4))
    s = torch.diagonal(random.S)
    assert bool((s[:-1] >= s[1:]).all()) and bool((s > 0).all())


# -- tdlrt ------------------------------------------------------------------------------------------------------------


def _tdlrt(out=36, inp=64, rank=2, seed=0, rank_max=100):
    """A 4-mode Tucker layer (6, 6) x (8, 8) from the HOSVD of a random weight at ranks ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(inp, out).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=gen, dtype=DT))
    return tdlrt_layer(linear, Tucker(), TDLRT.Params(init_rank=rank, rank_max=rank_max), gen)


def _unfold(T, i):
    return T.movedim(i, 0).reshape(T.shape[i], -1)


def _contract_all_but(T, mats, skip):
    """T x_j mats[j]^T for every j != skip (tensordot, independent of the layer's _mode_dot)."""
    for j, M in enumerate(mats):
        if j != skip:
            T = torch.tensordot(T, M, dims=([j], [0])).movedim(-1, j)
    return T


def test_tdlrt_forward_is_the_dense_product():
    layer = _tdlrt(rank=3)
    assert layer.out_dims == (6, 6) and layer.in_dims == (8, 8)
    assert layer.ranks() == (3, 3, 3, 3)
    x = torch.randn(2, 3, 64, dtype=DT)
    W = layer.to_dense()
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias)
    # independent rebuild of W from the core and factors (einsum)
    U0, U1, U2, U3 = layer.factors
    T = torch.einsum("abcd,ia,jb,kc,ld->ijkl", layer.core, U0, U1, U2, U3)
    torch.testing.assert_close(W, T.reshape(36, 64))
    assert layer.stored_params() == 3 ** 4 + 3 * (6 + 6 + 8 + 8)


def test_tdlrt_k_gradients_from_one_backward_match_the_k_forms():
    layer = _tdlrt(rank=2)
    x, y = _batch(64, 36)
    layer.begin_basis_step()
    Qs, Ks = layer.k_forms()
    _loss(layer(x), y).backward()
    grads = layer.k_gradients()
    core, factors, b = layer.core, layer.factors, layer.bias.detach()
    W = layer.to_dense().detach().requires_grad_(True)
    _loss(x @ W.T + b, y).backward()
    G = W.grad.reshape(6, 6, 8, 8)
    for i in range(4):
        shape = list(core.shape)
        kcore = Qs[i].T.reshape(shape[i], *(shape[:i] + shape[i + 1:])).movedim(0, i)  # fold_i(Q_i^T)
        K = Ks[i].detach().clone().requires_grad_(True)
        mats = list(factors)
        mats[i] = K
        # the K_i-form reproduces the weight ...
        torch.testing.assert_close(tucker_apply(torch.eye(64, dtype=DT), kcore, mats, (6, 6), (8, 8)).T,
                                   layer.to_dense())
        # ... and its autograd gradient is what the single backward gave
        _loss(tucker_apply(x, kcore, mats, (6, 6), (8, 8)) + b, y).backward()
        torch.testing.assert_close(grads[i], K.grad)
        # = Mat_i(G x_{j != i} U_j^T) Q_i from the dense gradient
        torch.testing.assert_close(grads[i], _unfold(_contract_all_but(G, factors, i), i) @ Qs[i])


def test_tdlrt_step_without_truncation_is_the_projected_gradient_step():
    layer, lr = _tdlrt(rank=2), 0.1
    x, y = _batch(64, 36)
    core, factors, b = layer.core.clone(), [U.clone() for U in layer.factors], layer.bias.detach().clone()
    W = layer.to_dense().detach().requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    _loss(x @ W.T + bias, y).backward()
    G = W.grad.reshape(6, 6, 8, 8)
    projectors = []
    for i, U in enumerate(factors):
        Q, R = torch.linalg.qr(_unfold(core, i).T)
        K_new = U @ R.T - lr * _unfold(_contract_all_but(G, factors, i), i) @ Q
        Ua = torch.linalg.qr(torch.cat([K_new, U], dim=1))[0]
        projectors.append(Ua @ Ua.T)
    step = G
    for i, P in enumerate(projectors):  # G x_i (U~_i U~_i^T)
        step = torch.tensordot(step, P, dims=([i], [0])).movedim(-1, i)
    expected = W.detach() - lr * step.reshape(36, 64)

    integrator_step(layer, [layer], lambda: _loss(layer(x), y), lr=lr, tau=0.0)
    assert layer.ranks() == (4, 4, 4, 4)
    torch.testing.assert_close(layer.to_dense(), expected)
    torch.testing.assert_close(layer.bias.detach(), b - lr * bias.grad)
    assert (layer.to_dense() - (W.detach() - lr * G.reshape(36, 64))).norm() > 1e-3
    for U in layer.factors:
        torch.testing.assert_close(U.T @ U, _eye(U.shape[1]))


def test_tdlrt_truncation_ranks_per_mode():
    # C[a, b, c, e] = A[a, c] B[b, e]: modes 0, 2 have singular values s(A) ||B||, modes 1, 3 s(B) ||A||, and
    # ||C|| = ||A|| ||B||, so each mode's rank is the tail rule on s(A) or s(B) alone.
    gen = torch.Generator().manual_seed(5)
    sA = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=DT)  # tails 4.61, 2.29, 1.118, 0.5, 0
    sB = torch.tensor([3.0, 1.0, 0.1, 0.01], dtype=DT)  # tails 3.16, 1.005, 0.1005, 0.01, 0
    A = _orthonormal(4, 4, gen) @ torch.diag(sA) @ _orthonormal(4, 4, gen).T
    B = _orthonormal(4, 4, gen) @ torch.diag(sB) @ _orthonormal(4, 4, gen).T
    C = torch.einsum("ac,be->abce", A, B)

    def truncated(tau, rank_min=2, rank_max=None):
        layer = TuckerDLRTLinear(C, [_orthonormal(8, 4, gen) for _ in range(4)], (8, 8), (8, 8), None,
                                 rank_min=rank_min, rank_max=rank_max)
        before = layer.to_dense()
        layer.truncate(tau)
        for U in layer.factors:
            torch.testing.assert_close(U.T @ U, _eye(U.shape[1]))
        if tau == 0.0:
            torch.testing.assert_close(layer.to_dense(), before)
        return layer.ranks()

    assert truncated(0.2) == (3, 2, 3, 2)  # tol 0.92 of s(A): tail 0.5 at j=3; 0.633 of s(B): 0.1005 at j=2
    assert truncated(0.05) == (4, 2, 4, 2)  # s(A): no tail < 0.23 before j=4; s(B): 0.1005 < 0.158 at j=2
    assert truncated(0.5) == (2, 2, 2, 2)  # rule: 1 everywhere, rank_min 2
    assert truncated(0.5, rank_min=1) == (1, 1, 1, 1)
    assert truncated(0.05, rank_max=3) == (3, 2, 3, 2)
    assert truncated(0.0) == (4, 4, 4, 4)  # the core's size (the default cap, the mode size 8, does not bind)
    assert truncated(0.0, rank_max=None) == (4, 4, 4, 4)


def test_tdlrt_rank_cap_is_explicit():
    from rankbench_plugins.trainers.tdlrt import mode_caps, start_ranks

    assert TDLRT.Params().max_rank_fraction == 1.0 and TDLRT.version == "2"
    assert mode_caps((8, 8, 28, 28), None) == (8, 8, 28, 28)  # default: only the mode size binds
    assert mode_caps((8, 8, 28, 28), None, 0.5) == (4, 4, 14, 14)  # version 1's default cap
    assert mode_caps((8, 8, 28, 28), 10, 0.5) == (4, 4, 10, 10)
    assert start_ranks((8, 8, 28, 28), mode_caps((8, 8, 28, 28), None), None) == (4, 4, 14, 14)  # start as before
    layer = _tdlrt(rank=3, rank_max=None)
    assert layer.rank_caps == (6, 6, 8, 8)


# -- training runs (the kind's loop, a planted problem) ----------------------------------------------------------------


class Planted(TrainingTask):
    """A student Linear(20 -> 16) regressing a teacher W* (default: rank 3) with squared error."""

    name = "planted"
    epochs = 12

    def __init__(self, teacher: torch.Tensor | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        Us = torch.linalg.qr(torch.randn(16, 3, generator=gen))[0]
        Vs = torch.linalg.qr(torch.randn(20, 3, generator=gen))[0]
        self.teacher = Us @ torch.diag(torch.tensor([3.0, 2.0, 1.5])) @ Vs.T if teacher is None else teacher

    def fresh_model(self, ctx):
        torch.manual_seed(ctx.task_seed)
        return nn.Sequential(nn.Linear(20, 16))

    def target_sites(self, model):
        return {"0": model[0]}

    def training_batches(self, ctx, epoch):
        gen = torch.Generator().manual_seed(1000 * ctx.task_seed + epoch)
        for _ in range(10):
            x = torch.randn(64, 20, generator=gen)
            yield x, x @ self.teacher.T

    def batch_loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum(dim=1).mean()

    def training_settings(self):
        return TrainingSettings(epochs=self.epochs, lr=0.05, optimizer="sgd")

    def evaluate(self, ctx, model):
        with torch.no_grad():
            W = model[0].to_dense()
        ctx.metric("rel_error", float((W - self.teacher).norm() / self.teacher.norm()))


def _ctx(tmp_path):
    return CellContext(cell_id="t", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None, shared={},
                       cache_dir=tmp_path)


def _curve(ctx, name):
    return [row["value"] for row in ctx.curve_rows if row["curve"] == name]


def test_dlrt_learns_the_planted_rank(tmp_path):
    ctx = _ctx(tmp_path)
    run_training(Planted(), ctx, DLRT(DLRT.Params(tau=0.1, lr=0.2)), SVD())
    ranks = _curve(ctx, "rank:0")
    assert ranks[0] == 8  # starts at the cap min(16, 20) // 2
    assert ranks[-1] == 3  # exactly the teacher's rank (tolerance 0)
    loss = _curve(ctx, "train_loss")
    assert len(loss) == Planted.epochs and loss[-1] < 1e-3 * loss[0]
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    assert metrics["rel_error"] < 1e-2
    assert metrics["params"] == 3 * (16 + 20) and metrics["rank_total"] == 3
    assert math.isclose(metrics["param_ratio"], 3 * 36 / 320)
    assert ctx.ranks_rows == [{"site": "0", "rank": 3, "rank_per_mode": "3", "params": 108}]


def test_tdlrt_learns_planted_tucker_ranks(tmp_path):
    # teacher: Tucker ranks (2, 3, 2, 3) on the modes (4, 4, 5, 4) of the 16 x 20 weight
    gen = torch.Generator().manual_seed(11)
    core = torch.randn(2, 3, 2, 3, generator=gen)
    factors = [torch.linalg.qr(torch.randn(n, r, generator=gen))[0] for n, r in zip((4, 4, 5, 4), core.shape)]
    teacher = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors).reshape(16, 20)
    teacher = teacher * 4.0 / teacher.norm()
    ctx = _ctx(tmp_path)
    run_training(Planted(teacher), ctx, TDLRT(TDLRT.Params(tau=0.1, lr=0.2, init_rank=4)), Tucker())
    ranks = _curve(ctx, "rank:0")
    assert ranks[0] == 4 + 4 + 4 + 4  # starts at init_rank 4 (within the mode sizes)
    assert ctx.ranks_rows[0]["rank_per_mode"] == "2x3x2x3"  # exactly the teacher's ranks
    loss = _curve(ctx, "train_loss")
    assert loss[-1] < 1e-3 * loss[0]
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    assert metrics["rel_error"] < 1e-2
    assert metrics["params"] == 2 * 3 * 2 * 3 + 4 * 2 + 4 * 3 + 5 * 2 + 4 * 3


def test_tdlrt_ranks_move_up_and_down_in_one_run(tmp_path):
    # teacher: Tucker ranks (1, 3, 1, 3) on the modes (4, 4, 5, 4); the run starts at ranks 2 on every mode, so the
    # modes 0, 2 must shrink and the modes 1, 3 grow (the default cap, the mode size, lets them)
    gen = torch.Generator().manual_seed(11)
    core = torch.randn(1, 3, 1, 3, generator=gen)
    factors = [torch.linalg.qr(torch.randn(n, r, generator=gen))[0] for n, r in zip((4, 4, 5, 4), core.shape)]
    teacher = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors).reshape(16, 20)
    teacher = teacher * 4.0 / teacher.norm()
    ctx = _ctx(tmp_path)
    seen = []
    original = TuckerDLRTLinear.truncate

    def recording(self, tau):
        original(self, tau)
        seen.append(self.ranks())

    TuckerDLRTLinear.truncate = recording
    try:
        run_training(Planted(teacher), ctx, TDLRT(TDLRT.Params(tau=0.1, lr=0.2, init_rank=2, rank_min=1)), Tucker())
    finally:
        TuckerDLRTLinear.truncate = original
    start = (2, 2, 2, 2)
    assert any(r[i] > start[i] for r in seen for i in range(4))  # up somewhere
    assert any(r[i] < start[i] for r in seen for i in range(4))  # down somewhere
    assert ctx.ranks_rows[0]["rank_per_mode"] == "1x3x1x3"  # ends at the teacher's ranks
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    assert metrics["rel_error"] < 1e-2


def test_trainers_skip_other_formats():
    assert DLRT().format_skip(Tucker()) is not None and DLRT().format_skip(SVD()) is None
    assert TDLRT().format_skip(SVD()) is not None and TDLRT().format_skip(Tucker()) is None
    with pytest.raises(TypeError):
        DLRT().select(None)


def test_indexwise_adam_is_torch_adam_on_the_reference_fixed_shape_buffers():
    """optimizer: adam is the DLRT reference's KLS_optim=torch.optim.Adam: one Adam over a buffer of the largest
    shape whose leading block holds the factor. Here the factor's shape grows and shrinks between steps (rank
    changes) and its values are overwritten before each step (a new basis), as the reference's preprocess steps do;
    the active block after every step equals torch.optim.Adam's on that buffer."""
    from rankbench_plugins.trainers._integrator import IndexwiseAdam

    gen = torch.Generator().manual_seed(0)
    buffer = nn.Parameter(torch.zeros(9, 7, dtype=DT))
    reference = torch.optim.Adam([buffer], lr=0.01, betas=(0.8, 0.99), eps=1e-8)
    ours = IndexwiseAdam(betas=(0.8, 0.99), eps=1e-8)
    for shape in [(4, 3), (6, 5), (9, 7), (5, 2), (7, 6), (3, 3)]:
        block = tuple(slice(0, n) for n in shape)
        value = torch.randn(*shape, generator=gen, dtype=DT)
        grad = torch.randn(*shape, generator=gen, dtype=DT)
        with torch.no_grad():
            buffer[block] = value
        buffer.grad = torch.zeros_like(buffer)
        buffer.grad[block] = grad
        reference.step()
        factor = value.clone().requires_grad_(True)
        factor.grad = grad
        torch.testing.assert_close(ours.step("K", factor, lr=0.01), buffer.detach()[block], rtol=1e-12, atol=1e-14)


def test_dlrt_with_adam_trains_and_keeps_its_moments_per_factor():
    torch.manual_seed(0)
    layer = _dlrt(out=8, inp=6, r=3, rank_max=4)
    from rankbench_plugins.trainers._integrator import IndexwiseAdam

    layer.adam = IndexwiseAdam()
    x, y = _batch(6, 8, n=64)
    first = _loss(layer(x), y).item()
    for _ in range(60):
        integrator_step(layer, [layer], lambda: _loss(layer(x), y), lr=0.02, tau=0.05)
    assert _loss(layer(x), y).item() < 0.5 * first
    assert set(layer.adam.state) == {"K", "L", "S", "bias"}
    assert all(count == 60 for _, _, count in layer.adam.state.values())
    assert layer.adam.state["K"][0].shape[1] <= 4  # K's moments never wider than the rank cap
