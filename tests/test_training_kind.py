"""The ``training`` problem kind (``rankbench.kinds.training``) on ``mlp-classification``: pairing, the dense
reference, post-hoc compression of exactly that network, and what a trainer cell records."""

import pytest

from conftest import ROOT
from rankbench.context import CellContext
from rankbench.plugins import load_plugins
from rankbench.suite import expand, load_suite
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.tt import TT
from rankbench_plugins.selectors.uniform import UniformSelector
from rankbench_plugins.tasks.mlp_classification import MLPClassification, MLPParams
from rankbench_plugins.trainers.dlrt import DLRT
from rankbench.kinds import run_cell

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make(**params) -> MLPClassification:
    return MLPClassification(MLPParams.model_validate({"dataset": "digits", "hidden": [24], "epochs": 3, "lr": 1e-2,
                                                       **params}))


def make_ctx(tmp_path, shared, budget=None) -> CellContext:
    return CellContext(cell_id="c", seed=0, task_seed=0, device="cpu", budget=budget,
                       budget_kind="param_ratio" if budget is not None else None, shared=shared,
                       cache_dir=tmp_path / "mlp-classification")


def metrics(ctx) -> dict:
    return {m["metric"]: m["value"] for m in ctx.metrics}


def test_pairing_runs_trainers_in_their_formats_and_selectors_post_hoc(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: t\ntasks: [{mlp-classification: {dataset: digits}}]\n"
                     "selectors: [dlrt, bayes-tensor, uniform]\nfactorizations: [svd, tt, lora]\nbudgets: [0.5]\n")
    cells = {(c.selector, c.factorization): c for c in expand(load_suite(suite), load_plugins(), "cpu", None)}
    runs = {pair for pair, c in cells.items() if not c.skip_reason}
    assert runs == {("none", "dense"), ("dlrt", "svd"), ("bayes-tensor", "tt"), ("uniform", "svd"), ("uniform", "tt")}
    assert "trains svd layers, not tt" in cells["dlrt", "tt"].skip_reason
    assert cells["dlrt", "svd"].budget is None and cells["uniform", "svd"].budget == 0.5  # trainers are budget-free
    assert "lora" in cells["uniform", "lora"].skip_reason


def test_reference_trains_and_posthoc_cells_compress_that_network(tmp_path):
    task, shared = make(), {}
    ref = make_ctx(tmp_path, shared)
    task.setup(ref)
    run_cell(task, ref)
    dense = metrics(ref)
    assert dense["params"] == 64 * 24 + 24 * 10 and dense["param_ratio"] == 1.0 and dense["accuracy"] > 0.5
    assert [r["step"] for r in ref.curve_rows if r["curve"] == "train_loss"] == [1.0, 2.0, 3.0]
    # compression cells in a fresh process load the cached weights: the network they compress is the reference's
    fresh = make_ctx(tmp_path, {})
    task.evaluate(fresh, task.model(fresh))
    assert metrics(fresh)["accuracy"] == dense["accuracy"]
    half = make_ctx(tmp_path, {}, budget=0.5)
    run_cell(task, half, UniformSelector(), TT())
    assert metrics(half)["param_ratio"] <= 0.5


def test_trainer_cell_records_ranks_params_and_trajectories(tmp_path):
    task = make()
    ctx = make_ctx(tmp_path, {})
    run_cell(task, ctx, DLRT(DLRT.Params(tau=0.2)), SVD())
    got = metrics(ctx)
    ranks = {row["site"]: row for row in ctx.ranks_rows}
    assert set(ranks) == {"layers.0", "layers.1"}
    for site, width in (("layers.0", 64 + 24), ("layers.1", 24 + 10)):  # U S merged: r (in + out)
        assert ranks[site]["params"] == ranks[site]["rank"] * width
    assert got["params"] == sum(row["params"] for row in ranks.values())
    assert got["param_ratio"] == pytest.approx(got["params"] / (64 * 24 + 24 * 10))
    assert got["rank_total"] == sum(row["rank"] for row in ranks.values())
    curves = {}
    for row in ctx.curve_rows:
        curves.setdefault(row["curve"], []).append((row["step"], row["value"]))
    assert {"train_loss", "rank_total", "param_ratio", "rank:layers.0", "rank:layers.1"} <= set(curves)
    assert [s for s, _ in curves["rank_total"]] == [0.0, 1.0, 2.0, 3.0]  # the initial rank, then per epoch
    assert curves["rank_total"][-1][1] == got["rank_total"]


def test_a_diverging_trainer_ends_the_cell_as_diverged(tmp_path):
    from rankbench.api import Diverged

    task = make(epochs=1)
    with pytest.raises(Diverged):
        run_cell(task, make_ctx(tmp_path, {}), DLRT(DLRT.Params(lr=1e6)), SVD())


def test_the_suites_with_trainers_list_them_in_slices():
    for name in ("train", "nightly", "smoke"):
        slices = load_suite(ROOT / "suites" / f"{name}.yaml").spec.slices
        names = {next(iter(s)) if isinstance(s, dict) else s for piece in slices for s in piece.selectors}
        assert {"dlrt", "bayes-tensor"} <= names
