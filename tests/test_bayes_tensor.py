"""Tests of the ``bayes-tensor`` rank-adaptive trainer (``rankbench_plugins.trainers.bayes_tensor``).

Known answers: the EM updates against a numerical maximisation of the log joint over the scale; the KL schedule at
the MNIST script's numbers; the groups' sizes; full-rank layers against the dense forward of their weight; and
teacher-student training on data from a planted low-rank tensorized weight (CP rank 2, Tucker ranks (2, 2, 2, 2),
TT ranks (1, 2, 2, 2, 1), TT-matrix rank 2 over 8 x 8 x 8 x 8) started at max rank 6: the prior prunes the surplus,
without it nothing is pruned.

inference = svi (Pyro): the draws' forward against the dense forward of the drawn weight (and its gradients), Pyro's
loss against the closed-form ELBO of the module docstring, the Monte Carlo estimator against the closed-form one, the
EM step as the ELBO's maximiser over the scales, the masks of a pruned TT bond; and, with a Gaussian likelihood at
the true noise (256 examples, noise std 1), the planted TT ranks (2, 2, 2) recovered from max rank 6 with the ELBO
rising over training (CP and TT-matrix rank 2 in the slow tests). The compression split (param_ratio_vs_start,
start_param_ratio) against hand counts in both modes.
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


# ------------------------------------------------------------------------------------------------------------------
# compression split: against dense and against the format's start (max-rank) size


START = {"cp": 6 * (8 + 8 + 8 + 8 + 1), "tucker": 6**4 + 8 * 6 * 4, "tt": 8 * 6 + 6 * 8 * 6 + 6 * 8 * 6 + 6 * 8,
         "ttm": 64 * 6 + 6 * 64}  # stored parameters at max_rank 6, by hand


@pytest.mark.parametrize("fmt", FORMATS)
def test_param_ratio_vs_start_is_the_hand_count(ard_runs, fmt):
    """param_ratio_vs_start = stored params at the final ranks / stored params at max_rank; start_param_ratio = the
    latter over dense, so param_ratio = start_param_ratio x param_ratio_vs_start (format x rank determination)."""
    layer, metrics, _, _ = ard_runs[fmt]
    assert layer.start_params() == START[fmt]
    assert metrics["start_params"] == START[fmt]
    assert metrics["start_param_ratio"] == pytest.approx(START[fmt] / (IN * OUT))
    assert metrics["param_ratio_vs_start"] == pytest.approx(layer.stored_params() / START[fmt])
    assert metrics["param_ratio"] == pytest.approx(metrics["start_param_ratio"] * metrics["param_ratio_vs_start"])


# ------------------------------------------------------------------------------------------------------------------
# inference = svi: the variational layer, the Pyro model and guide


def _svi_layer(fmt, *, seed=1, **kwargs):
    torch.manual_seed(seed)
    return build_layer(FORMATS[fmt](), nn.Linear(IN, OUT), max_rank=6, seed=seed, posterior_scale=0.1, **kwargs)


class _Run:
    """What ``TensorizedSVI`` needs of a ``TrainingRun``: the model and ``loss(batch)`` (here a Gaussian NLL)."""

    def __init__(self, layer):
        self.model = nn.Sequential(layer)

    def loss(self, batch):
        x, y = batch
        return 0.5 * (self.model(x) - y).square().sum(-1).mean()


@pytest.mark.parametrize("fmt", FORMATS)
def test_svi_layer_forward_uses_the_draws_with_gradients_and_the_mean_otherwise(fmt):
    """With drawn factors set, the forward is the dense forward of the weight those factors make, and gradients reach
    the draws (the reparameterisation path); without, it is the posterior mean's forward."""
    layer = _svi_layer(fmt)
    x = torch.randn(5, IN)
    mean_forward = nn.functional.linear(x, layer.inner.to_dense().detach(), layer.inner.bias)
    torch.testing.assert_close(layer(x), mean_forward, rtol=1e-5, atol=1e-6)
    draws = {name: (mu.detach() + 0.1 * torch.randn_like(mu)).requires_grad_() for name, mu, _, _ in
             layer.prior_tensors()}
    layer._draws = draws
    y = layer(x)
    layer._draws = None
    key = "factors" if fmt in ("cp", "tucker") else "cores"
    with torch.no_grad():
        saved = [p.clone() for p in getattr(layer.inner, key)]
        for k, p in enumerate(getattr(layer.inner, key)):
            p.copy_(draws[f"{key}.{k}"])
        W = layer.inner.to_dense().clone()
        for p, s in zip(getattr(layer.inner, key), saved):
            p.copy_(s)
    torch.testing.assert_close(y, nn.functional.linear(x, W, layer.inner.bias), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert all(d.grad is not None and float(d.grad.abs().sum()) > 0 for d in draws.values())
    torch.testing.assert_close(layer(x), mean_forward, rtol=1e-5, atol=1e-6)  # the list is restored


@pytest.mark.parametrize("fmt", FORMATS)
def test_svi_loss_is_the_elbo_of_the_docstring(fmt):
    """Pyro's TraceMeanField loss / N at kl weight beta equals (the task loss at the same draw) + beta (KL(q || p(.|s))
    - log p(s)) / N, with the closed-form KL over the live entries: the ELBO (8) of the module docstring."""
    layer = _svi_layer(fmt)
    svi = bt.TensorizedSVI(_Run(layer), {"0": layer}, data_size=1000)
    batch = (torch.randn(16, IN), torch.randn(16, OUT))
    for beta in (1.0, 0.3, 0.0):
        objective, task_loss = svi.loss(batch, beta)
        expected = task_loss + beta * svi.prior_terms().detach() / 1000
        assert float(objective.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert layer._draws is None
    # the closed-form KL agrees with torch's Normal-Normal KL entry by entry
    kl = sum(torch.distributions.kl_divergence(torch.distributions.Normal(mu, layer.posterior_std(k)),
                                               torch.distributions.Normal(0.0, layer._prior_scale(k, layer.live(k))))
             .sum() for k, (_, mu, _, _) in enumerate(layer.prior_tensors()))
    assert float(layer.kl_divergence().detach()) == pytest.approx(float(kl.detach()), rel=1e-5)


def test_svi_monte_carlo_estimator_agrees_with_the_closed_form_kl():
    """estimator = trace (Trace_ELBO, KL by sampling) has the mean of estimator = mean_field (closed-form KL)."""
    layer = _svi_layer("ttm")
    run = _Run(layer)
    batch = (torch.randn(8, IN), torch.randn(8, OUT))
    closed, sampled = bt.TensorizedSVI(run, {"0": layer}, 1000), bt.TensorizedSVI(run, {"0": layer}, 1000, "trace")
    torch.manual_seed(0)
    with torch.no_grad():
        a = np.mean([float(closed.loss(batch)[0]) for _ in range(300)])
        b = [float(sampled.loss(batch)[0]) for _ in range(300)]
    assert a == pytest.approx(np.mean(b), abs=4 * np.std(b) / math.sqrt(len(b)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prior", bt.PRIORS)
def test_svi_em_step_maximises_the_elbo_over_the_scales(fmt, prior):
    """After the variational EM step, moving any s_r^2 up or down lowers the ELBO (raises KL - log p(s))."""
    layer = _svi_layer(fmt, prior=prior, eta=0.5)
    svi = bt.TensorizedSVI(_Run(layer), {"0": layer}, data_size=100)
    layer.em_step()
    with torch.no_grad():
        best = float(svi.prior_terms())
        for j in range(layer.slots):
            for r in range(layer.scale2(j).numel()):
                for factor in (0.97, 1.03):
                    layer.scale2(j)[r] *= factor
                    assert float(svi.prior_terms()) > best
                    layer.scale2(j)[r] /= factor


def test_svi_pruned_bond_is_masked_out_of_both_cores_and_the_sums():
    """TT: pruning component r of bond k masks G_k[..., r] and G_{k+1}[r, ...] out of the model, the guide and the
    group sums; the live counts D_r shrink accordingly."""
    layer = _svi_layer("tt")
    with torch.no_grad():
        layer.mask(0)[1] = False  # bond 0 (between cores 0 and 1), component 1
        layer._pruned = True
        layer.enforce_masks()
    live0, live1 = layer.live(0), layer.live(1)
    assert not live0[..., 1].any() and live0[..., 0].all()
    assert not live1[1].any() and live1[0].all()
    sums = layer.variational_sums()
    assert float(sums[0][1][1]) == 0.0 and float(sums[0][1][0]) == 8  # D of bond 0: 1 x 8 entries per component
    assert torch.all(sums[1][1] == 5 * 8)  # bond 1: cores[1][r', :, r] for the 5 live r'
    assert float(layer.inner.cores[1].detach()[1].abs().max()) == 0.0
    layer.em_step()
    assert float(layer.scale2(0)[1]) == 0.0


def test_svi_balance_keeps_the_weight_and_the_posterior_shape():
    layer = _svi_layer("tt")
    with torch.no_grad():
        layer.inner.cores[0].mul_(30.0)
        layer.inner.cores[1].div_(30.0)
    W = layer.inner.to_dense().detach().clone()
    ratio = [(layer.posterior_std(k) / layer.inner.cores[k].detach().abs().clamp_min(1e-12)).clone() for k in (0, 1)]
    layer.balance()
    torch.testing.assert_close(layer.inner.to_dense(), W, rtol=1e-5, atol=1e-7)
    for k in (0, 1):  # sigma / |mu| unchanged: each slice's sigma was scaled with its mean
        after = layer.posterior_std(k) / layer.inner.cores[k].detach().abs().clamp_min(1e-12)
        torch.testing.assert_close(after.detach(), ratio[k].detach(), rtol=1e-3, atol=0.0)


def test_count_examples_reads_the_leading_dimension():
    x, y = torch.zeros(10, 3), torch.zeros(10)
    assert bt.count_examples([(x, y), (x[:4], y[:4])]) == 14
    assert bt.count_examples([x, x]) == 20
    assert bt.count_examples([{"a": x}]) == 10
    with pytest.raises(ValueError, match="data_size"):
        bt.count_examples([object()])


def test_svi_params():
    svi = BayesTensorTrainer(BayesTensorTrainer.Params(inference="svi"))
    assert svi.relative_threshold == 5e-2 and BayesTensorTrainer().relative_threshold == 0.0
    assert BayesTensorTrainer.Params().inference == "map"
    assert BayesTensorTrainer.version == "2"
    with pytest.raises(ValueError, match="kl_multiplier"):
        BayesTensorTrainer.Params(inference="svi", kl_multiplier=1e-3)
    # the worker validates a cell's resolved parameters (every field spelled out) again
    assert BayesTensorTrainer.Params.model_validate(svi.params.model_dump(mode="json")).inference == "svi"


# ------------------------------------------------------------------------------------------------------------------
# inference = svi: teacher-student runs with a Gaussian likelihood


class GaussianTeacherTask(TeacherTask):
    """The teacher with a proper likelihood: batch_loss is the Gaussian NLL per example (up to a constant) at the true
    noise std, sum_j (y_j - f_j)^2 / (2 noise^2) averaged over the batch, so -N x batch_loss is the data set's
    log-likelihood. noise 1 and n = 256: the ELBO's prior is strong enough to prune within the test's budget."""

    def __init__(self, W, *, noise=1.0, n=256, batch=16, lr=1e-2, epochs=100):
        super().__init__(W, epochs=epochs, lr=lr, n=n, batch=batch, noise=noise)
        self.noise = noise

    def batch_loss(self, model, batch):
        x, y = batch
        return 0.5 * (model(x) - y).square().sum(-1).mean() / self.noise**2


def _train_svi(fmt: str, tmp: Path, *, epochs=100, **params):
    task = GaussianTeacherTask(_planted_weight(fmt), epochs=epochs)
    params = dict(dict(inference="svi", max_rank=6, no_kl_epochs=0, warmup_epochs=0), **params)
    trainer = BayesTensorTrainer(BayesTensorTrainer.Params(**params))
    ctx = _ctx(tmp)
    torch.manual_seed(0)
    run_training(task, ctx, trainer, FORMATS[fmt]())
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    curves = {}
    for row in ctx.curve_rows:
        curves.setdefault(row["curve"], []).append(row["value"])
    return task.model[0], metrics, curves


@pytest.fixture(scope="module")
def svi_tt_run(tmp_path_factory):
    """TT, max rank 6 over the planted (2, 2, 2); the exact ELBO (kl_weight 1, no warm-up); Adam lr 1e-2; 100 epochs
    of 16 batches of 16."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_svi("tt", tmp_path_factory.mktemp("svi"))
    finally:
        torch.set_num_threads(threads)


def test_svi_prunes_a_planted_tt_rank(svi_tt_run):
    """Known answer: the learned scales prune the surplus of a planted TT rank (2, 2, 2) from max rank 6 (tolerance:
    the planted ranks, +1 allowed per bond; seen: exactly (2, 2, 2)). The surviving components hold the fit: the
    posterior mean's error is at the noise floor of the fit (noise variance 1 on outputs of variance 1, n = 256)."""
    layer, metrics, _ = svi_tt_run
    ranks = layer.ranks()
    assert all(2 <= r <= 3 for r in ranks), ranks
    assert ranks == (2, 2, 2)  # what the test sees; the tolerance above is the contract
    assert metrics["mse"] < 0.02
    assert isinstance(layer, bt.VariationalTensorLinear) and not layer.training
    s2 = [layer.scale2(j)[layer.mask(j)] for j in range(layer.slots)]
    assert min(float(s.min()) for s in s2) > 0.05  # the survivors' scales are far above the pruned ones' threshold


def test_svi_elbo_increases_over_training(svi_tt_run):
    """The per-example ELBO recorded each epoch (the task loss at the draws plus (KL - log p(s)) / N, i.e. Pyro's
    loss at beta = 1) rises from the initial network to the trained one, and its 20-epoch means never fall by more
    than the minibatch noise."""
    _, _, curves = svi_tt_run
    elbo = np.asarray(curves["elbo"])
    assert len(elbo) == 100
    assert elbo[-10:].mean() > elbo[:1].mean() + 20  # -79 -> -34 per example here
    blocks = elbo.reshape(5, 20).mean(axis=1)
    assert np.all(np.diff(blocks) > -0.3), blocks


def test_svi_compression_metrics_are_the_hand_count(svi_tt_run):
    layer, metrics, curves = svi_tt_run
    r = layer.ranks()
    hand = 8 * r[0] + r[0] * 8 * r[1] + r[1] * 8 * r[2] + r[2] * 8
    assert metrics["params"] == hand == layer.stored_params()
    assert metrics["param_ratio_vs_start"] == pytest.approx(hand / START["tt"])
    assert metrics["param_ratio"] == pytest.approx(hand / (IN * OUT))
    assert curves["rank:0"][0] == 18 and all(b <= a for a, b in zip(curves["rank:0"], curves["rank:0"][1:]))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cp", "ttm"])
def test_svi_prunes_planted_cp_and_ttm_ranks(tmp_path, fmt):
    """CP rank 2 and TT-matrix rank 2 from max rank 6, 200 epochs (the idle components' scales fall more slowly
    than TT's): the planted ranks, +1 allowed (seen: exactly 2)."""
    layer, metrics, _ = _train_svi(fmt, tmp_path, epochs=200)
    rank = _as_tuple(layer.ranks())[0]
    assert 2 <= rank <= 3, rank
    assert metrics["mse"] < 0.03
