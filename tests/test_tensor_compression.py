"""Tensor-format factorizations (cp, tucker, tt, ttm) in the compression protocol, on the tiny MLP task of
``test_compression_kind``: full ranks reproduce the dense model, budgets are met on the exact cost, fits are reused."""

import pytest
import torch
from test_compression_kind import DENSE, SITES, FullRank, Tiny, assert_unchanged, metric, snapshot

from rankbench.context import CellContext
from rankbench_plugins.factorizations.cp import CP
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.tt import TT
from rankbench_plugins.factorizations.ttm import TTM
from rankbench_plugins.factorizations.tucker import Tucker
from rankbench.kinds.tensor_compression import tensor_sites
from rankbench_plugins.selectors.energy import EnergySelector
from rankbench_plugins.selectors.sensitivity import SensitivitySelector
from rankbench_plugins.selectors.uniform import UniformSelector
from rankbench_plugins.selectors.welore import WeLoreSelector
from rankbench.kinds import run_cell

FORMATS = {"tucker": Tucker, "tt": TT, "ttm": lambda: TTM(TTM.Params(order_out=3, order_in=3))}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_ctx(tmp_path, shared, budget=None):
    return CellContext(cell_id="t", seed=0, task_seed=0, device="cpu", budget=budget, budget_kind="param_ratio",
                       shared=shared, cache_dir=tmp_path)


def dense_loss(task, tmp_path):
    ctx = make_ctx(tmp_path, {})
    run_cell(task, ctx)
    return metric(ctx, "loss")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_full_ranks_reproduce_the_dense_model(name, tmp_path):
    task, shared = Tiny(), {}
    ctx = make_ctx(tmp_path, shared, 1.0)
    model = task.model(ctx)
    snap = snapshot(model)
    selector = FullRank()
    run_cell(task, ctx, selector, FORMATS[name]())
    assert metric(ctx, "loss") == pytest.approx(dense_loss(Tiny(), tmp_path), rel=1e-9)
    assert_unchanged(model, snap)
    # every slot at its cap: the ranks are per slot (tuples) and the cost is the format's exact count
    site = selector.problem.sites[0]
    assert site.mode_singular_values is not None and len(site.rank_caps) == len(site.mode_singular_values)
    assert metric(ctx, "params") == sum(row["params"] for row in ctx.ranks_rows)
    assert all("x" in row["rank_per_mode"] for row in ctx.ranks_rows)


def test_cp_is_a_single_rank_read_from_the_matrix_spectrum(tmp_path):
    task, shared = Tiny(), {}
    ctx = make_ctx(tmp_path, shared, 0.5)
    task.model(ctx)
    (site, *_) = tensor_sites(task, ctx, CP())
    weight = task.sites(ctx)["body.0"].weight.detach().to(torch.float64)
    assert site.mode_singular_values is None and site.shape == tuple(weight.shape)
    torch.testing.assert_close(torch.as_tensor(site.singular_values), torch.linalg.svdvals(weight))
    dims = CP().dims(tuple(weight.shape))
    per_component = sum(dims[0]) + sum(dims[1]) + 1
    assert site.params_at_rank(3) == 3 * per_component and site.max_rank * per_component <= weight.numel()


@pytest.mark.parametrize("name", ["cp", "tucker", "tt", "ttm", "ttm-2"])
@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_budgeted_selectors_meet_param_ratio_on_the_exact_cost(name, budget, tmp_path):
    factorization = {"cp": CP, "ttm-2": TTM, **FORMATS}[name]()
    for selector in (UniformSelector(), EnergySelector()):
        task, shared = Tiny(), {}
        ctx = make_ctx(tmp_path, shared, budget)
        run_cell(task, ctx, selector, factorization)
        assert metric(ctx, "param_ratio") <= budget + 1e-12
        assert metric(ctx, "params") == sum(row["params"] for row in ctx.ranks_rows) <= budget * DENSE
        assert set(row["site"] for row in ctx.ranks_rows) == set(SITES)


def test_fits_and_spectra_are_memoised_per_task_configuration(tmp_path, monkeypatch):
    task, shared = Tiny(), {}
    calls = []
    original = Tucker.fit

    def counting(self, weight, bias, ranks):
        calls.append(ranks)
        return original(self, weight, bias, ranks)

    monkeypatch.setattr(Tucker, "fit", counting)
    for _ in range(2):
        run_cell(task, make_ctx(tmp_path, shared, 0.5), UniformSelector(), Tucker())
    assert len(calls) == len(SITES)  # the second cell reused every fitted layer
    first = tensor_sites(task, make_ctx(tmp_path, shared), Tucker())
    assert tensor_sites(task, make_ctx(tmp_path, shared), Tucker())[0] is first[0]


def test_selectors_that_need_an_svd_decomposition_skip_tensor_formats():
    task = Tiny()
    for selector in (SensitivitySelector(), WeLoreSelector()):
        assert selector.skip(task, Tucker()) and selector.skip(task, CP())
        assert selector.skip(task, SVD()) is None
    assert task.skip(UniformSelector(), TT()) is None
