"""The compression protocol (``rankbench.kinds.compression``) on a tiny MLP regression task, checked
against statistics, losses and gradients computed directly here."""

import copy

import pytest
import torch
from torch import nn

from rankbench.api import PluginParams, RankProblem, Selector
from rankbench.context import CellContext
from rankbench_plugins.factorizations.asvd import ASVD
from rankbench_plugins.factorizations.fwsvd import FWSVD
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.svd_llm import SVDLLM
from rankbench.kinds.compression import (
    CompressionStatistics,
    CompressionTask,
    LowRankLinear,
    SigmaLinear,
    iter_named_linears,
    swapped,
)
from rankbench_plugins.selectors.uniform import UniformSelector
from rankbench.kinds import run_cell

IN, H1, H2, OUT = 12, 16, 10, 4
SITES = ("body.0", "body.2", "head")
DENSE = H1 * IN + H2 * H1 + OUT * H2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, H1), nn.Tanh(), nn.Linear(H1, H2), nn.Tanh())
        self.head = nn.Linear(H2, OUT)

    def forward(self, x):
        return self.head(self.body(x))


class Tiny(CompressionTask):
    """Regression with an MLP whose weights and data come from ``task_seed``; calibration batches are 3-D
    (batch x sequence x features) so that the statistics treat all leading dimensions as tokens."""

    name = "tiny"
    primary_metric = "loss"

    class Params(PluginParams):
        dtype: str = "float64"

    def __init__(self, params=None):
        super().__init__(params)
        self.loads = 0
        self.seen = {}

    @property
    def dtype(self):
        return getattr(torch, self.params.dtype)

    def build(self, task_seed):
        g = torch.Generator().manual_seed(100 + task_seed)
        model = MLP()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return model.to(self.dtype).eval()

    def load_model(self, ctx):
        self.loads += 1
        return self.build(ctx.task_seed)

    def target_sites(self, model):
        return dict(iter_named_linears(model, ("body", "head")))

    def data(self, seed, n, task_seed=0):
        """Inputs with uneven channel scales; targets from the dense model itself plus noise (a teacher)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, IN, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, IN, dtype=torch.float64)
        noise = 0.1 * torch.randn(n, 3, OUT, generator=g, dtype=torch.float64)
        x = x.to(self.dtype)
        with torch.no_grad():
            y = self.build(task_seed)(x) + noise.to(self.dtype)
        return x, y

    def calibration_batches(self, ctx):
        x, y = self.data(200 + ctx.task_seed, 12, ctx.task_seed)
        return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]

    def calibration_loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(self, ctx, model):
        self.seen = {name: model.get_submodule(name) for name in SITES}
        x, y = self.data(300 + ctx.task_seed, 20, ctx.task_seed)
        with torch.no_grad():
            ctx.metric("loss", float(((model(x) - y) ** 2).mean()), higher_is_better=False)


class FullRank(Selector):
    name = "full-rank"

    def select(self, problem: RankProblem):
        self.problem = problem
        return {site.name: site.max_rank for site in problem.sites}


class Fixed(Selector):
    name = "fixed"

    def __init__(self, ranks):
        super().__init__()
        self.ranks = ranks

    def select(self, problem):
        return self.ranks


@pytest.fixture
def shared():
    return {}


@pytest.fixture
def make_ctx(tmp_path, shared):
    def make(budget=0.5, task_seed=0, store=None):
        return CellContext(
            cell_id="t",
            seed=0,
            task_seed=task_seed,
            device="cpu",
            budget=budget,
            budget_kind="param_ratio",
            shared=shared if store is None else store,
            cache_dir=tmp_path,
        )

    return make


def metric(ctx, name):
    values = [m["value"] for m in ctx.metrics if m["metric"] == name]
    assert len(values) == 1, (name, ctx.metrics)
    return values[0]


def site_inputs(model, x):
    """The input of every site, computed by hand (no hooks)."""
    h1 = torch.tanh(model.body[0](x))
    h2 = torch.tanh(model.body[2](h1))
    return {"body.0": x, "body.2": h1, "head": h2}


def dense_calibration_loss(task, ctx, model):
    with torch.no_grad():
        losses = [float(task.calibration_loss(model, b)) for b in task.calibration_batches(ctx)]
    return sum(losses) / len(losses)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: model.get_submodule(n) for n in SITES}


def assert_unchanged(model, snap):
    state, modules = snap
    for name in SITES:
        assert model.get_submodule(name) is modules[name]
        assert type(model.get_submodule(name)) is nn.Linear
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert all(p.grad is None for p in model.parameters())


# -- statistics ---------------------------------------------------------------------------------------------------


def test_gram_and_input_abs_mean_equal_direct_computation(make_ctx):
    task, ctx = Tiny(), make_ctx()
    stats = task.statistics(ctx, ["gram", "input_abs_mean"])
    model = task.model(ctx)
    gram = dict.fromkeys(SITES, 0)
    absum = dict.fromkeys(SITES, 0)
    tokens = 0
    with torch.no_grad():
        for x, _ in task.calibration_batches(ctx):
            X = x.reshape(-1, IN)
            tokens += X.shape[0]
            for name, h in site_inputs(model, X).items():
                gram[name] = gram[name] + h.T @ h
                absum[name] = absum[name] + h.abs().sum(0)
    assert set(stats) == set(SITES)
    for name in SITES:
        assert stats[name].gram.dtype == torch.float64
        torch.testing.assert_close(stats[name].gram, gram[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[name].input_abs_mean, absum[name] / tokens, rtol=1e-12, atol=1e-12)
        assert stats[name].tokens == tokens == 3 * 4 * 3
        assert stats[name].fisher_rows is None and stats[name].weight_grad is None


def test_fisher_rows_and_weight_grad_equal_direct_computation(make_ctx):
    task, ctx = Tiny(), make_ctx()
    model = task.model(ctx)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = task.statistics(ctx, ["fisher_rows", "weight_grad"])
    # the pass leaves the model as it was: flags restored, no .grad anywhere
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    twin = copy.deepcopy(model)
    fisher = dict.fromkeys(SITES, 0)
    grad = dict.fromkeys(SITES, 0)
    batches = task.calibration_batches(ctx)
    for batch in batches:
        twin.zero_grad()
        task.calibration_loss(twin, batch).backward()
        for name in SITES:
            g = twin.get_submodule(name).weight.grad
            fisher[name] = fisher[name] + (g**2).sum(dim=1)
            grad[name] = grad[name] + g
    for name in SITES:
        torch.testing.assert_close(stats[name].fisher_rows, fisher[name] / len(batches), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(stats[name].weight_grad, grad[name] / len(batches), rtol=1e-10, atol=1e-14)
        assert stats[name].gram is None


def test_statistics_are_computed_once_per_kind(make_ctx, shared):
    task = Tiny()
    task.statistics(make_ctx(), ["gram"])
    first = shared["counters"]["calibration_passes"]
    gram = task.statistics(make_ctx(), ["gram"])["head"].gram
    assert shared["counters"]["calibration_passes"] == first == 1
    task.statistics(make_ctx(), ["gram", "fisher_rows"])  # only fisher_rows is missing
    task.statistics(make_ctx(), ["fisher_rows", "gram"])
    assert shared["counters"]["calibration_passes"] == 2
    assert task.statistics(make_ctx(), ["gram"])["head"].gram is gram  # kept, not recomputed
    with pytest.raises(ValueError, match="unknown statistics"):
        task.statistics(make_ctx(), ["hessian"])


def test_decompositions_are_reused_across_cells(make_ctx, shared):
    task = Tiny()
    for budget in (0.8, 0.5, 0.3):
        run_cell(task, make_ctx(budget), UniformSelector(), SVDLLM())
    counters = shared["counters"]
    assert counters["decompositions"] == len(SITES) and counters["calibration_passes"] == 1
    for budget in (0.8, 0.5):
        run_cell(task, make_ctx(budget), UniformSelector(), ASVD())
    assert counters["decompositions"] == 2 * len(SITES) and counters["calibration_passes"] == 2
    run_cell(task, make_ctx(0.5), UniformSelector(), SVD())  # needs nothing: no calibration pass
    assert counters["decompositions"] == 3 * len(SITES) and counters["calibration_passes"] == 2
    run_cell(task, make_ctx(0.5), UniformSelector(), ASVD(ASVD.Params(alpha=1.0)))  # other parameters: decomposed again
    assert counters["decompositions"] == 4 * len(SITES) and counters["calibration_passes"] == 2
    assert task.loads == 1
    # only the latest factorization's decompositions are held; going back recomputes them (statistics stay)
    assert len(task.calibration_memo(make_ctx())["decompositions"]) == len(SITES)
    run_cell(task, make_ctx(0.3), UniformSelector(), SVDLLM())
    assert counters["decompositions"] == 5 * len(SITES) and counters["calibration_passes"] == 2


def test_seed_dependent_work_is_keyed_by_task_seed(make_ctx, shared):
    task = Tiny()
    run_cell(task, make_ctx(0.5, task_seed=0), UniformSelector(), SVDLLM())
    gram0 = task.statistics(make_ctx(task_seed=0), ["gram"])["head"].gram
    run_cell(task, make_ctx(0.5, task_seed=1), UniformSelector(), SVDLLM())
    assert task.loads == 2
    assert shared["counters"]["calibration_passes"] == 2 and shared["counters"]["decompositions"] == 2 * len(SITES)
    gram1 = task.statistics(make_ctx(task_seed=1), ["gram"])["head"].gram
    assert not torch.allclose(gram0, gram1)

    class SeedFree(Tiny):
        def model_key(self, ctx):
            return None

        def calibration_key(self, ctx):
            return None

    other, store = SeedFree(), {}
    for seed in (0, 1, 2):
        run_cell(other, make_ctx(0.5, task_seed=seed, store=store), UniformSelector(), SVDLLM())
    assert other.loads == 1 and store["counters"]["calibration_passes"] == 1


# -- cells --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("factorization", [SVD(), ASVD(), FWSVD(), SVDLLM()], ids=lambda f: f.name)
def test_full_rank_cell_gives_the_dense_metric(make_ctx, factorization, dtype, rtol):
    task = Tiny(Tiny.Params(dtype=dtype))
    reference = make_ctx(None)
    run_cell(task, reference)
    ctx = make_ctx(1.0)
    selector = FullRank()
    run_cell(task, ctx, selector, factorization)
    assert metric(ctx, "loss") == pytest.approx(metric(reference, "loss"), rel=rtol)
    ranks = {row["site"]: row["rank"] for row in ctx.ranks_rows}
    assert ranks == {"body.0": IN, "body.2": H2, "head": OUT}
    kept = IN * (H1 + IN) + H2 * (H2 + H1) + OUT * (OUT + H2)
    assert metric(ctx, "params") == kept and metric(ctx, "param_ratio") == pytest.approx(kept / DENSE)
    assert {row["site"]: row["params"] for row in ctx.ranks_rows}["head"] == OUT * (OUT + H2)
    # the selector saw the factorization's spectra and exact costs
    for site in selector.problem.sites:
        d = task.decomposition(ctx, factorization, site.name)
        assert (site.singular_values == d.s.numpy()).all() and site.max_rank == d.rank
        assert site.params_at_rank(2) == 2 * sum(site.shape)
    for module in task.seen.values():
        assert isinstance(module, LowRankLinear)
    assert {"time_calibrate_s", "time_decompose_s", "time_select_s", "time_evaluate_s"} <= {
        f"time_{k}_s" for k in ctx.timer.seconds
    }


def test_budget_cell_compresses_and_restores_the_model(make_ctx):
    task, ctx = Tiny(), make_ctx(0.5)
    reference = make_ctx(None)
    run_cell(task, reference)
    model = task.model(ctx)
    snap = snapshot(model)
    x = task.data(7, 5)[0]
    with torch.no_grad():
        before = model(x)
    run_cell(task, ctx, UniformSelector(), SVDLLM())
    # uniform at rho = 0.5: k = floor(0.5 m n / (m + n))
    expected = {"body.0": 3, "body.2": 3, "head": 1}
    assert {row["site"]: row["rank"] for row in ctx.ranks_rows} == expected
    assert {name: module.rank for name, module in task.seen.items()} == expected
    kept = 3 * (H1 + IN) + 3 * (H2 + H1) + 1 * (OUT + H2)
    assert metric(ctx, "params") == kept
    assert metric(ctx, "param_ratio") == pytest.approx(kept / DENSE) and kept / DENSE <= 0.5
    assert metric(ctx, "loss") > metric(reference, "loss")
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_reference_cell(make_ctx):
    task, ctx = Tiny(), make_ctx(None)
    run_cell(task, ctx)
    assert metric(ctx, "params") == DENSE and metric(ctx, "param_ratio") == 1.0
    model = task.model(ctx)
    x, y = task.data(300, 20)
    with torch.no_grad():
        assert metric(ctx, "loss") == pytest.approx(float(((model(x) - y) ** 2).mean()), rel=1e-12)
    assert ctx.ranks_rows == []


def test_bad_ranks_leave_the_model_dense(make_ctx):
    task, ctx = Tiny(), make_ctx(0.5)
    model = task.model(ctx)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no rank for site 'head'"):
        run_cell(task, ctx, Fixed({"body.0": 2, "body.2": 2}), SVD())
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="one integer rank"):
        run_cell(task, make_ctx(0.5), Fixed({"body.0": 2, "body.2": (2, 2), "head": 1}), SVD())
    assert_unchanged(model, snap)
    # out-of-range ranks are clipped to [1, p] and recorded as used
    ctx = make_ctx(0.5)
    run_cell(task, ctx, Fixed({"body.0": 0, "body.2": 99, "head": 2}), SVD())
    assert {row["site"]: row["rank"] for row in ctx.ranks_rows} == {"body.0": 1, "body.2": H2, "head": 2}
    assert_unchanged(model, snap)


def test_statistics_refuse_a_swapped_model(make_ctx):
    task, ctx = Tiny(), make_ctx(0.5)
    model, sites = task.model(ctx), task.sites(ctx)
    decompositions = {name: task.decomposition(ctx, SVD(), name) for name in sites}
    with swapped(model, sites, SVD(), decompositions, dict.fromkeys(SITES, 1)):
        with pytest.raises(RuntimeError, match="dense model"):
            task.statistics(ctx, ["gram"])
    assert type(model.head) is nn.Linear


# -- CompressionStatistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("factorization", [SVD(), SVDLLM(), FWSVD()], ids=lambda f: f.name)
def test_calibration_loss_and_sigma_loss(make_ctx, factorization):
    task, ctx = Tiny(), make_ctx(0.5)
    selector = FullRank()
    run_cell(task, ctx, selector, factorization)
    problem = selector.problem
    model = task.model(ctx)
    snap = snapshot(model)
    dense = dense_calibration_loss(task, ctx, model)

    calibration_loss = problem.stats.calibration_loss
    full = {name: task.decomposition(ctx, factorization, name).rank for name in SITES}
    assert calibration_loss(full) == pytest.approx(dense, rel=1e-10)
    assert calibration_loss({"body.2": 1}) > dense  # one site compressed, the others dense
    assert_unchanged(model, snap)

    sigma_loss = problem.stats.sigma_loss
    decompositions = {name: problem.stats.decomposition(name) for name in SITES}
    sigmas = {name: d.s.clone().requires_grad_(True) for name, d in decompositions.items()}
    loss = sigma_loss(sigmas)
    assert float(loss.detach()) == pytest.approx(dense, rel=1e-10)
    grads = torch.autograd.grad(loss, [sigmas[n] for n in SITES], create_graph=True)
    for name, grad in zip(SITES, grads):
        d, G = decompositions[name], problem.stats.weight_grad(name)
        expected = torch.diagonal(d.left.T @ G @ d.right.T)  # ∂L/∂σ_i = u_iᵀ (∂L/∂W) r_i
        torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)
    # second order: a Hessian-vector product matches a central difference of the gradient
    name = "body.2"
    v = torch.randn(len(sigmas[name]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (hvp,) = torch.autograd.grad(grads[1], sigmas[name], grad_outputs=v)
    h = 1e-5 * float(sigmas[name].detach().max())

    def gradient_at(step):
        moved = {n: (s + step * v if n == name else s).detach().requires_grad_(True) for n, s in sigmas.items()}
        return torch.autograd.grad(sigma_loss(moved), moved[name])[0]

    difference = (gradient_at(h) - gradient_at(-h)) / (2 * h)
    torch.testing.assert_close(hvp, difference, rtol=1e-5, atol=1e-7 * float(hvp.abs().max()))
    # the model's own parameters were frozen during the sigma pass: no .grad, flags back, sites dense
    assert_unchanged(model, snap)
    assert all(p.requires_grad for p in model.parameters())
    # a leading block of sigma: the rank-k weight
    k = 2
    truncated = sigma_loss({"body.0": decompositions["body.0"].s[:k]})
    assert float(truncated) == pytest.approx(calibration_loss({"body.0": k}), rel=1e-10)
    counters = ctx.shared["counters"]
    assert counters["sigma_loss_evaluations"] == 4 and counters["calibration_evaluations"] == 3


def test_compression_statistics_names(make_ctx):
    task, ctx = Tiny(), make_ctx(0.5)
    stats = CompressionStatistics(task, ctx, ASVD())
    assert torch.equal(stats.input_abs_mean("head"), task.statistics(ctx, [])["head"].input_abs_mean)
    assert stats.decomposition("head") is task.decomposition(ctx, ASVD(), "head")
    # the selector-side store: one per factorization configuration, kept across cells, new with new calibration
    store = stats.store()
    store["x"] = 1
    assert CompressionStatistics(task, make_ctx(0.3), ASVD()).store() is store
    assert CompressionStatistics(task, ctx, ASVD(ASVD.Params(alpha=1.0))).store() == {}
    assert CompressionStatistics(task, make_ctx(0.3, task_seed=1), ASVD()).store() == {}
    with pytest.raises(KeyError):
        stats.gram("nope")
    with pytest.raises(KeyError):
        stats.calibration_loss({"nope": 1})


def test_sigma_linear_matches_the_low_rank_weight():
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(6, 5, dtype=torch.float64)
    d = SVD().decompose(dense.weight.detach(), None)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    layer = SigmaLinear(d, d.s[:3], dense)
    torch.testing.assert_close(layer(x), x @ d.matrix(3).T + dense.bias, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        SigmaLinear(d, torch.ones(6, dtype=torch.float64), dense)


class TinyOnDisk(Tiny):
    """Tiny whose model and calibration data are named by content: its decompositions are cached on disk."""

    def decomposition_cache_key(self, ctx):
        return f"tiny-{self.params.dtype}-{ctx.task_seed}"


def test_decompositions_are_reused_from_disk_by_a_fresh_process_and_verified(make_ctx, tmp_path, monkeypatch):
    """A second 'process' (a fresh shared memo) reads the first one's decompositions instead of computing them and
    gets the same metrics; other parameters or a damaged file are computed again."""
    monkeypatch.delenv("RANKBENCH_NO_DECOMPOSITION_CACHE", raising=False)
    first, second, third = {}, {}, {}
    ctx = make_ctx(0.5, store=first)
    run_cell(TinyOnDisk(), ctx, UniformSelector(), SVDLLM())
    assert first["counters"]["decompositions"] == len(SITES)
    files = sorted((tmp_path / "decompositions").rglob("*.pt"))
    assert len(files) == len(SITES)
    again = make_ctx(0.5, store=second)
    run_cell(TinyOnDisk(), again, UniformSelector(), SVDLLM())
    assert second["counters"].get("decompositions", 0) == 0
    assert second["counters"]["decompositions_from_disk"] == len(SITES)
    assert metric(again, "loss") == metric(ctx, "loss")
    # other parameters of the factorization: their own files
    run_cell(TinyOnDisk(), make_ctx(0.5, store=third), UniformSelector(), ASVD(ASVD.Params(alpha=1.0)))
    assert third["counters"]["decompositions"] == len(SITES)
    # a damaged file is detected by its checksum, recomputed and replaced
    files[0].write_bytes(files[0].read_bytes()[:-40] + b"\0" * 40)
    fourth = {}
    run_cell(TinyOnDisk(), make_ctx(0.5, store=fourth), UniformSelector(), SVDLLM())
    assert fourth["counters"]["decompositions"] == 1 and fourth["counters"]["decompositions_from_disk"] == len(SITES) - 1
    fifth = {}
    run_cell(TinyOnDisk(), make_ctx(0.5, store=fifth), UniformSelector(), SVDLLM())
    assert fifth["counters"]["decompositions_from_disk"] == len(SITES)


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (30, 30)])
def test_thin_svd_equals_torch_svd(shape):
    """``thin_svd`` (Gram eigendecomposition) gives torch.linalg.svd's spectrum, subspaces and reconstruction on a
    conditioned matrix, and still rebuilds a rank-deficient one exactly."""
    from rankbench.kinds.compression import thin_svd

    g = torch.Generator().manual_seed(0)
    p = min(shape)
    left, _ = torch.linalg.qr(torch.randn(shape[0], p, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(shape[1], p, generator=g, dtype=torch.float64))
    planted = torch.logspace(0, -4, p, dtype=torch.float64)
    matrix = (left * planted) @ right.T
    U, s, Vh = thin_svd(matrix)
    assert U.shape == (shape[0], p) and s.shape == (p,) and Vh.shape == (p, shape[1])
    assert torch.allclose(s, planted, rtol=1e-8, atol=0)
    assert torch.allclose((U * s) @ Vh, matrix, atol=1e-13)
    k = p // 2  # the leading subspaces are the planted ones: the rank-k truncations agree
    assert torch.allclose((U[:, :k] * s[:k]) @ Vh[:k], (left[:, :k] * planted[:k]) @ right[:, :k].T, atol=1e-12)
    deficient = matrix.clone()
    deficient[:, 0] = 0
    deficient[0] = 0
    U, s, Vh = thin_svd(deficient)
    assert torch.isfinite(U).all() and torch.allclose((U * s) @ Vh, deficient, atol=1e-13)


def test_a_compensation_reuses_its_base_decompositions(make_ctx, shared):
    """EoRA at several ranks over svd-llm decomposes once, under svd-llm's identity (``decomposed_by``), and an
    svd-llm cell after it decomposes nothing more; the compensation changes the model (rank 2 beats rank 0)."""
    from rankbench_plugins.factorizations.eora import EoRA

    task = Tiny()
    losses = {}
    for rank in (0, 1, 2):
        ctx = make_ctx(0.5)
        run_cell(task, ctx, UniformSelector(), EoRA(EoRA.Params(base="svd-llm", rank=rank)))
        losses[rank] = metric(ctx, "loss")
    run_cell(task, make_ctx(0.5), UniformSelector(), SVDLLM())
    assert shared["counters"]["decompositions"] == len(SITES)
    assert losses[2] < losses[0]
