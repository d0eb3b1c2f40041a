"""Tests of the ``bayes-tensor`` rank-adaptive trainer (``rankbench_plugins.trainers.bayes_tensor``).

Known answers: the EM updates against a numerical maximisation of the log joint over the scale; the KL schedule at
the MNIST script's numbers; the groups' sizes; full-rank layers against the dense forward of their weight; and
teacher-student training on data from a planted low-rank tensorized weight (CP rank 2, Tucker ranks (2, 2, 2, 2),
TT ranks (1, 2, 2, 2, 1), TT-matrix rank 2 over 8 x 8 x 8 x 8) started at max rank 6: the prior prunes the surplus,
without it nothing is pruned.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from rankbench.context import CellContext
from rankbench.kinds import tensor_formats as tf
from rankbench_plugins.factorizations.cp import CP
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.tt import TT
from rankbench_plugins.factorizations.ttm import TTM
from rankbench_plugins.factorizations.tucker import Tucker
from rankbench.kinds.training import TrainingSettings, TrainingTask, run_training
from rankbench_plugins.trainers import bayes_tensor as bt
from rankbench_plugins.trainers.bayes_tensor import BayesTensorTrainer, build_layer, em_update, kl_multiplier_at

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FORMATS = {"cp": CP, "tucker": Tucker, "tt": TT, "ttm": TTM}
OUT = IN = 64  # 8 x 8 on each side (the default order 2 + 2)
DIMS = (8, 8)
PLANTED = {"cp": 2, "tucker": (2, 2, 2, 2), "tt": (2, 2, 2), "ttm": (2,)}
FULL = {"cp": 6, "tucker": (6, 6, 6, 6), "tt": (6, 6, 6), "ttm": (6,)}  # max_rank 6, all feasible here


# ------------------------------------------------------------------------------------------------------------------
# the closed-form EM updates


def _argmax_scale2(M: float, D: int, log_prior) -> float:
    """s^2 maximising log N(G | 0, s^2 I_D) + log p(s) for a group with squared sum M (numerically, over log s)."""

    def negative(u):  # u = log s
        s2 = math.exp(2 * u)
        return 0.5 * M / s2 + D * u - log_prior(math.exp(u))

    centre = 0.5 * math.log(M / D)
    result = minimize_scalar(negative, bounds=(centre - 10, centre + 10), method="bounded",
                             options={"xatol": 1e-12})
    return math.exp(2 * result.x)


@pytest.mark.parametrize("M, D", [(1.0, 8), (0.37, 48), (25.0, 3), (1e-4, 200)])
def test_log_uniform_update_is_the_map_scale(M, D):
    """(4): M / (D + 1) maximises the log joint over s with p(s) ~ 1/s (the log-uniform hyper-prior)."""
    numeric = _argmax_scale2(M, D, lambda s: -math.log(s))
    closed = float(em_update(torch.tensor([M], dtype=torch.float64), D, "log_uniform"))
    assert closed == pytest.approx(M / (D + 1), rel=1e-12)
    assert closed == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("M, D, eta", [(1.0, 8, 1.0), (0.37, 48, 0.1), (25.0, 3, 2.0), (1e-3, 200, 0.01),
                                       (1e-6, 100, 1.0)])
def test_half_cauchy_update_is_the_map_scale(M, D, eta):
    """(5) is the stationary point (maximum) over s of the log joint with the half-Cauchy(eta) hyper-prior, and the
    cancellation-free evaluation agrees with the formula as written (float64)."""
    numeric = _argmax_scale2(M, D, lambda s: -math.log1p((s / eta) ** 2))
    closed = float(em_update(torch.tensor([M], dtype=torch.float64), D, "half_cauchy", eta))
    written = (M - D * eta**2 + math.sqrt(M**2 + (2 * D + 8) * eta**2 * M + eta**4 * D**2)) / (2 * D + 4)
    assert closed == pytest.approx(numeric, rel=1e-6)
    assert closed == pytest.approx(written, rel=1e-6)
    # the derivative of the log joint in s vanishes there: M / s^3 - D / s - 2 s / (eta^2 + s^2) = 0
    s = math.sqrt(closed)
    assert M / s**3 - D / s - 2 * s / (eta**2 + s**2) == pytest.approx(0.0, abs=1e-6 * D / s)


def test_half_cauchy_update_is_stable_in_float32_for_tiny_groups():
    M = torch.tensor([1e-9, 1e-4, 1.0], dtype=torch.float32)
    ours = em_update(M, 500, "half_cauchy", 1.0)
    exact = em_update(M.double(), 500, "half_cauchy", 1.0)
    assert torch.all(ours > 0)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=0.0)


def test_em_step_damping_and_groups():
    """s^2 <- (1 - step) s^2 + step * update, per slot, with the reference's groups."""
    linear = nn.Linear(IN, OUT)
    layer = build_layer(TT(), linear, max_rank=6, em_stepsize=0.5)
    before = [layer.scale2(j).clone() for j in range(layer.slots)]
    with torch.no_grad():
        for G in layer.inner.cores:
            G.mul_(2.0)  # every M_r x 4
    layer.train()
    layer(torch.randn(3, IN))
    for j in range(layer.slots):
        torch.testing.assert_close(layer.scale2(j), 0.5 * before[j] + 0.5 * 4 * before[j])


@pytest.mark.parametrize("fmt, counts", [
    ("cp", [32]),  # every factor's column r: sum of the dims
    ("tucker", [8, 8, 8, 8]),  # column r of U_k
    ("tt", [8, 6 * 8, 6 * 8 + 8]),  # G_k[..., r] (r_{k-1} n_k entries); the last bond adds G_N[r, ...]
    ("ttm", [64 + 64]),  # G_1[..., r] (o_1 i_1) and, last bond, G_2[r, ...]
])
def test_group_sizes_follow_the_reference(fmt, counts):
    layer = build_layer(FORMATS[fmt](), nn.Linear(IN, OUT), max_rank=6)
    assert layer.counts == counts
    with torch.no_grad():
        M = layer._sums()
    assert [tuple(m.shape) for m in M] == [(r,) for r in _as_tuple(FULL[fmt])]
    total = sum(float(m.sum()) for m in M)
    inner = layer.inner
    carrying = inner.cores if fmt in ("tt", "ttm") else inner.factors  # Tucker: the core carries no prior
    entries = sum(float(t.detach().square().sum()) for t in carrying)
    assert total == pytest.approx(entries, rel=1e-5)  # every prior-carrying entry in exactly one group


# ------------------------------------------------------------------------------------------------------------------
# schedule


def test_kl_schedule_matches_the_mnist_script_and_scales_with_the_budget():
    k = 5e-5
    assert kl_multiplier_at(5, k, 5, 50) == 0.0
    assert kl_multiplier_at(6, k, 5, 50) == pytest.approx(k / 50)
    assert kl_multiplier_at(30, k, 5, 50) == pytest.approx(k * 25 / 50)
    assert kl_multiplier_at(55, k, 5, 50) == pytest.approx(k)
    assert kl_multiplier_at(100, k, 5, 50) == pytest.approx(k)
    assert kl_multiplier_at(1, k, 0, 0) == k and kl_multiplier_at(0, k, 0, 0) == 0.0
    trainer = BayesTensorTrainer()
    assert trainer.schedule(100) == pytest.approx((5.0, 50.0))
    assert trainer.schedule(10) == pytest.approx((0.5, 5.0))
    fixed = BayesTensorTrainer(BayesTensorTrainer.Params(no_kl_epochs=2, warmup_epochs=3))
    assert fixed.schedule(10) == (2.0, 3.0)


# ------------------------------------------------------------------------------------------------------------------
# layers at full rank


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_rank_fit_reproduces_the_site_forward(fmt):
    """init = fit at a rank where the format is exact (Tucker / TT / TTM: full rank; CP: a site of CP rank 2, fitted
    at rank 2): the layer's forward equals the dense Linear's (CP lambda folded into the factors)."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).double()
    if fmt == "cp":
        with torch.no_grad():
            linear.weight.copy_(_planted_weight("cp", seed=3).double())
    layer = build_layer(FORMATS[fmt](), linear, max_rank=64 if fmt != "cp" else 2, init="fit")
    x = torch.randn(5, IN, dtype=torch.float64)
    tolerance = dict(rtol=1e-4, atol=1e-6) if fmt == "cp" else dict(rtol=1e-6, atol=1e-8)  # CP-ALS stops at its tol
    torch.testing.assert_close(layer(x), linear(x), **tolerance)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_forward_is_the_dense_forward_of_its_weight(fmt):
    """Random init at max rank, zero KL, in train (EM runs) and eval mode: y = x W^T + b with W the layer's
    reconstructed weight; the contraction forward of the format's own layer is used."""
    linear = nn.Linear(IN, OUT)
    layer = build_layer(FORMATS[fmt](), linear, max_rank=6, seed=1)
    x = torch.randn(7, IN)
    W = layer.inner.to_dense().detach()
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, W, layer.inner.bias), rtol=1e-5, atol=1e-6)
    assert layer.ranks() == FULL[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_site_init_matches_the_site_weight_scale(fmt):
    """init = site: the reconstructed weight's entries have the std of the site's initial weight (the reference's
    "nn" init formula at target = that std); kaiming: sqrt(2 / in)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 256)
    target = float(linear.weight.detach().std())
    stds = [float(build_layer(FORMATS[fmt](), linear, max_rank=8, seed=s).inner.to_dense().detach().std())
            for s in range(3)]
    assert np.mean(stds) == pytest.approx(target, rel=0.2)
    kaiming = build_layer(FORMATS[fmt](), linear, max_rank=8, init="kaiming").inner.to_dense().detach().std()
    assert float(kaiming) == pytest.approx(math.sqrt(2 / 256), rel=0.25)
    torch.testing.assert_close(build_layer(FORMATS[fmt](), linear, max_rank=8).inner.bias, linear.bias)


def test_max_ranks_are_clipped_to_the_feasible_set():
    # 6 x 4 weight: dims (3, 2) x (2, 2); TT bonds r_1 <= 3, r_2 <= min(6, 4), r_3 <= 2
    assert bt.max_ranks(TT(), (6, 4), 20) == (3, 4, 2)
    assert bt.max_ranks(Tucker(), (6, 4), 20) == (3, 2, 2, 2)
    assert bt.max_ranks(TTM(), (6, 4), 20) == (4,)
    assert bt.max_ranks(CP(), (6, 4), 20) == (20,)


# ------------------------------------------------------------------------------------------------------------------
# teacher-student training


def _planted_weight(fmt: str, seed: int = 0) -> torch.Tensor:
    """A 64 x 64 weight with the planted ranks of ``PLANTED`` in the format; outputs of unit variance for x ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    dims = (*DIMS, *DIMS)
    if fmt == "cp":
        layer = tf.CPLinear([randn(d, 2) for d in dims], torch.ones(2, dtype=torch.float64), DIMS, DIMS)
    elif fmt == "tucker":
        layer = tf.TuckerLinear(randn(2, 2, 2, 2), [randn(d, 2) for d in dims], DIMS, DIMS)
    elif fmt == "tt":
        r = (1, 2, 2, 2, 1)
        layer = tf.TTLinear([randn(r[k], d, r[k + 1]) for k, d in enumerate(dims)], DIMS, DIMS)
    else:
        layer = tf.TTMLinear([randn(1, 8, 8, 2), randn(2, 8, 8, 1)], DIMS, DIMS)
    W = layer.to_dense().detach()
    return (W / W.square().mean().sqrt() / math.sqrt(IN)).float()


class TeacherTask(TrainingTask):
    """y = W* x + noise (std 0.05), x ~ N(0, I_64); one Linear site; MSE loss; Adam."""

    name = "teacher"

    def __init__(self, W, *, epochs=100, lr=3e-3, n=1024, batch=64, noise=0.05):
        super().__init__()
        self.W, self.epochs, self.lr, self.n, self.batch = W, epochs, lr, n, batch
        g = torch.Generator().manual_seed(1)
        self.X = torch.randn(n, IN, generator=g)
        self.Y = self.X @ W.T + noise * torch.randn(n, OUT, generator=g)
        self.model = None

    def fresh_model(self, ctx):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(IN, OUT))
        return self.model

    def target_sites(self, model):
        return {"0": model[0]}

    def training_batches(self, ctx, epoch):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch))
        return [(self.X[perm[i:i + self.batch]], self.Y[perm[i:i + self.batch]]) for i in range(0, self.n, self.batch)]

    def batch_loss(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def training_settings(self):
        return TrainingSettings(epochs=self.epochs, lr=self.lr)

    def evaluate(self, ctx, model):
        x = torch.randn(1024, IN, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ctx.metric("mse", float((model(x) - x @ self.W.T).square().mean()))


def _ctx(tmp: Path) -> CellContext:
    return CellContext(cell_id="bt", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None, shared={},
                       cache_dir=tmp)


def _train(fmt: str, tmp: Path, *, epochs=100, lr=3e-3, **params):
    task = TeacherTask(_planted_weight(fmt), epochs=epochs, lr=lr)
    trainer = BayesTensorTrainer(BayesTensorTrainer.Params(max_rank=6, **params))
    ctx = _ctx(tmp)
    run_training(task, ctx, trainer, FORMATS[fmt]())
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    curves = {}
    for row in ctx.curve_rows:
        curves.setdefault(row["curve"], []).append(row["value"])
    return task.model[0], metrics, curves, ctx


def _as_tuple(r):
    return (r,) if isinstance(r, int) else tuple(r)


@pytest.fixture(scope="module")
def ard_runs(tmp_path_factory):
    """kl_multiplier 1e-3 (the MSE here is a mean over 64 outputs), Adam lr 3e-3, 100 epochs of 16 batches."""
    tmp = tmp_path_factory.mktemp("bayes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {fmt: _train(fmt, tmp, kl_multiplier=1e-3) for fmt in FORMATS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ard_prunes_the_surplus_of_a_planted_teacher(ard_runs, fmt):
    """Tolerance: CP, Tucker, TT-matrix end at the planted ranks (+1 allowed per slot); TT, whose reference grouping
    lets the first bond keep surplus components (see the module docstring), within +2 on every bond. Never below
    the planted ranks, and the fit stays at the noise level (output variance 1, noise variance 0.0025)."""
    layer, metrics, _, _ = ard_runs[fmt]
    ranks, planted = _as_tuple(layer.ranks()), _as_tuple(PLANTED[fmt])
    slack = 2 if fmt == "tt" else 1
    assert all(p <= r <= p + slack for r, p in zip(ranks, planted)), ranks
    assert sum(ranks) < sum(_as_tuple(FULL[fmt]))
    assert metrics["mse"] < 0.02
    if fmt != "tt":  # what the tests see on this set-up; the tolerance above is the contract
        assert ranks == planted


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_params_are_the_formats_hand_count(ard_runs, fmt):
    layer, metrics, curves, ctx = ard_runs[fmt]
    r = _as_tuple(layer.ranks())
    if fmt == "cp":
        hand = r[0] * (8 + 8 + 8 + 8 + 1)
    elif fmt == "tucker":
        hand = math.prod(r) + 8 * sum(r)
    elif fmt == "tt":
        hand = 8 * r[0] + r[0] * 8 * r[1] + r[1] * 8 * r[2] + r[2] * 8
    else:
        hand = 64 * r[0] + r[0] * 64
    assert layer.stored_params() == hand
    assert metrics["params"] == hand
    assert metrics["param_ratio"] == pytest.approx(hand / (IN * OUT))
    assert ctx.ranks_rows[0]["params"] == hand
    assert curves["param_ratio"][-1] == pytest.approx(hand / (IN * OUT))


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_curves_are_monotone_with_permanent_pruning(ard_runs, fmt):
    """prune = epoch masks components for good, so the recorded ranks never increase; epoch 0 is the max rank."""
    _, _, curves, _ = ard_runs[fmt]
    ranks = curves["rank:0"]
    assert ranks[0] == sum(_as_tuple(FULL[fmt]))
    assert all(b <= a for a, b in zip(ranks, ranks[1:]))
    assert len(ranks) == 101 and len(curves["train_loss"]) == 100


@pytest.mark.parametrize("fmt", FORMATS)
def test_pruned_components_are_zero_in_the_evaluated_layer(ard_runs, fmt):
    layer, _, _, _ = ard_runs[fmt]
    inner = layer.inner

    def zero(t):
        return t.numel() == 0 or float(t.detach().abs().max()) == 0.0

    pruned = 0
    for j in range(layer.slots):
        dead = ~layer.mask(j)
        pruned += int(dead.sum())
        assert int(layer.mask(j).sum()) == _as_tuple(layer._surviving_counts())[j]
        if fmt == "cp":
            assert all(zero(A[:, dead]) for A in inner.factors)
        elif fmt == "tucker":
            assert zero(inner.factors[j][:, dead])
            assert zero(inner.core.movedim(j, 0)[dead])
        else:
            assert zero(inner.cores[j][..., dead])
            assert zero(inner.cores[j + 1][dead])
    assert pruned > 0
    assert not layer.training
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, inner.to_dense(), inner.bias))


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_the_prior_nothing_is_pruned(tmp_path, fmt):
    layer, metrics, curves, _ = _train(fmt, tmp_path, epochs=15, lr=1e-2, kl_multiplier=0.0)
    assert _as_tuple(layer.ranks()) == _as_tuple(FULL[fmt])
    assert set(curves["rank:0"]) == {sum(_as_tuple(FULL[fmt]))}
    assert metrics["mse"] < 0.05


def test_tt_balance_recovers_the_planted_ranks(tmp_path):
    """balance = true (tt/ttm gauge fix) at the fast learning rate where the reference's MAP lets the middle bond's
    scale drift below the threshold: the planted TT ranks (+1 allowed), and a good fit."""
    layer, metrics, _, _ = _train("tt", tmp_path, lr=1e-2, kl_multiplier=1e-3, balance=True)
    ranks = layer.ranks()
    assert all(2 <= r <= 3 for r in ranks), ranks
    assert metrics["mse"] < 0.02


def test_balance_leaves_the_weight_unchanged():
    layer = build_layer(TT(), nn.Linear(IN, OUT), max_rank=6)
    with torch.no_grad():
        layer.inner.cores[0].mul_(30.0)
        layer.inner.cores[1].div_(30.0)
    W = layer.inner.to_dense().detach().clone()
    layer.balance()
    torch.testing.assert_close(layer.inner.to_dense(), W, rtol=1e-5, atol=1e-7)
    cores = layer.inner.cores
    ratios = []
    for j in range(layer.slots):
        left = cores[j].detach().square().mean(dim=(0, 1)).sqrt()
        right = cores[j + 1].detach().square().mean(dim=(1, 2)).sqrt()
        ratios.append(left / right)
    # one sweep, first bond to last: the first bond's 900x imbalance is gone, the last bond is exactly balanced (a
    # later bond's rescaling moves an earlier bond's right slices a little)
    assert all(torch.all((r - 1).abs() < 0.5) for r in ratios)
    torch.testing.assert_close(ratios[-1], torch.ones_like(ratios[-1]))
    assert layer.ranks() == FULL["tt"]


def test_prune_at_end_masks_once_after_training(tmp_path):
    """prune = end (the MNIST script): live rank estimates during training, masks applied after the last epoch."""
    layer, metrics, curves, _ = _train("cp", tmp_path, epochs=40, lr=1e-2, kl_multiplier=1e-3, prune="end")
    assert layer.ranks() == curves["rank:0"][-1]
    assert 2 <= layer.ranks() < 6
    assert int(layer.mask(0).sum()) == layer.ranks()
    assert metrics["mse"] < 0.05


def test_half_cauchy_prior_also_prunes(tmp_path):
    layer, metrics, _, _ = _train("ttm", tmp_path, epochs=60, lr=1e-2, kl_multiplier=1e-3, prior="half_cauchy",
                                  eta=1.0)
    assert layer.ranks()[0] < 6
    assert layer.ranks()[0] >= 2
    assert metrics["mse"] < 0.05


# ------------------------------------------------------------------------------------------------------------------
# plugin


def test_plugin_registration_and_formats():
    registered = []
    bt.rankbench_register_selectors(registered.append)
    assert registered == [BayesTensorTrainer]
    trainer = BayesTensorTrainer()
    assert trainer.name == "bayes-tensor"
    assert trainer.formats == frozenset({"cp", "tucker", "tt", "ttm"})
    assert trainer.format_skip(TT()) is None
    assert "svd" in trainer.format_skip(SVD())
    assert not trainer.uses_budget("param_ratio")
    with pytest.raises(TypeError):
        trainer.select(None)
    defaults = BayesTensorTrainer.Params()
    assert (defaults.kl_multiplier, defaults.max_rank, defaults.prior, defaults.em_stepsize, defaults.threshold) == (
        5e-5, 20, "log_uniform", 1.0, 1e-5)
