"""The ``pinn`` task: its network, pretraining cache, loss, metrics, and both problem kinds end to end (tiny sizes)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from rankbench.api import ADAPTATION, COMPRESSION, PARAM_RATIO, RANK_TOTAL
from rankbench.context import CellContext
from rankbench_plugins.factorizations.lora import LoRA
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.selectors.uniform import UniformSelector
from rankbench_plugins.tasks import _pde
from rankbench_plugins.tasks.pinn import PINN, PINNParams
from rankbench.kinds import pairing_skip, run_cell

TINY = dict(width=8, depth=2, pretrain_steps=30, steps=12, retrain_steps=4, n_interior=64, n_boundary=16, test_grid=9)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make(**params) -> PINN:
    return PINN(PINNParams.model_validate({**TINY, **params}))


def make_ctx(cache: Path, shared: dict | None = None, budget=None, budget_kind=None, seed: int = 0) -> CellContext:
    return CellContext(cell_id="t", seed=seed, task_seed=7, device="cpu", budget=budget, budget_kind=budget_kind,
                       shared={} if shared is None else shared, cache_dir=cache)


def metrics(ctx: CellContext) -> dict[str, float]:
    return {m["metric"]: m["value"] for m in ctx.metrics}


def test_params_validation():
    with pytest.raises(ValidationError, match="retrain_steps"):
        PINNParams(steps=10, retrain_steps=10)
    with pytest.raises(ValidationError, match="target"):
        PINNParams(pde="burgers", target=1e-9)  # below the validated Cole-Hopf range
    with pytest.raises(ValidationError):
        PINNParams(pde="heat")


def test_kinds_follow_the_problem_parameter():
    assert (make().problem_kind, make().budget_kind) == (ADAPTATION, RANK_TOTAL)
    task = make(problem="compression")
    assert (task.problem_kind, task.budget_kind) == (COMPRESSION, PARAM_RATIO)
    assert pairing_skip(task, UniformSelector(), LoRA()) and pairing_skip(task, UniformSelector(), SVD()) is None
    assert pairing_skip(make(), UniformSelector(), SVD()) and pairing_skip(make(), UniformSelector(), LoRA()) is None


def test_network_maps_the_box_and_counts_sites(tmp_path):
    task = make(pde="convection", width=6, depth=3)
    model = task.model(make_ctx(tmp_path))
    assert list(task.target_sites(model)) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    shapes = [tuple(layer.weight.shape) for layer in model.layers]
    assert shapes == [(6, 2), (6, 6), (6, 6), (1, 6)]
    corners = torch.tensor([[0.0, 0.0], [2 * math.pi, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(corners * model.scale + model.shift, torch.tensor([[-1.0, -1.0], [1.0, 1.0]],
                                                                                 dtype=torch.float64))


def test_pretraining_lowers_the_loss_and_is_cached_on_disk(tmp_path):
    task = make(pde="poisson", pretrain_steps=60, lr=0.01)
    ctx = make_ctx(tmp_path)
    model = task.model(ctx)
    problem = task.source_problem()
    untrained = make(pde="poisson", pretrain_steps=0).model(make_ctx(tmp_path / "fresh"))
    points = task.collocation(ctx, problem)
    assert task.pinn_loss(model, problem, points).item() < 0.5 * task.pinn_loss(untrained, problem, points).item()
    cached = list(tmp_path.glob("pretrained-poisson-*.pt"))
    assert len(cached) == 1
    again = make(pde="poisson", pretrain_steps=60, lr=0.01).model(make_ctx(tmp_path))  # a new process would load the file
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loss_and_metrics_vanish_for_the_reference_solution(tmp_path):
    """A 'network' that is the exact solution has (numerically) zero PINN loss and zero errors."""
    task = make(pde="poisson", source=2.0)
    ctx = make_ctx(tmp_path)
    problem = task.source_problem()
    exact = problem.reference
    assert task.pinn_loss(exact, problem, task.collocation(ctx, problem)).item() < 1e-20
    grid, reference = task._test_set(ctx, problem)
    assert _pde.relative_errors(exact(grid), reference)["l2re"] == 0.0


def test_adaptation_cell_end_to_end(tmp_path):
    """A rank_total cell: ranks within the budget, adapter parameters counted by hand, the pretrained net untouched."""
    task = make(pde="poisson", source=1.0, target=2.0)
    ctx = make_ctx(tmp_path, budget=3, budget_kind=RANK_TOTAL)
    task.setup(ctx)
    before = copy.deepcopy(task.pretrained_model(ctx).state_dict())
    run_cell(task, ctx, UniformSelector(), LoRA(LoRA.Params(init_rank=2)))
    got = metrics(ctx)
    ranks = {row["site"]: row["rank"] for row in ctx.ranks_rows}
    assert sum(ranks.values()) == got["rank_total"] <= 3
    shapes = {"layers.0": (8, 2), "layers.1": (8, 8), "layers.2": (1, 8)}
    assert got["params"] == sum(ranks[n] * (m + k + 1) for n, (m, k) in shapes.items())
    assert got["param_ratio"] == pytest.approx(got["params"] / (16 + 64 + 8))
    assert {"l2re", "l1re", "maxe", "mse", "final_loss", "l2re_pretrained"} <= set(got)
    for a, b in zip(before.values(), task.pretrained_model(ctx).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    curves = {row["curve"] for row in ctx.curve_rows}
    # the post-hoc selection point is a rank determination: loss and adapter gradient norms recorded there
    assert curves == {"train_loss", "rank_total", "loss_at_selection", "grad_norm_at_selection",
                      "grad_norm_E_at_selection"}


def test_reference_cell_fine_tunes_every_weight(tmp_path):
    task = make(pde="poisson", source=1.0, target=2.0, steps=40, retrain_steps=4)
    ctx = make_ctx(tmp_path)
    task.setup(ctx)
    run_cell(task, ctx)
    got = metrics(ctx)
    assert got["param_ratio"] == 1.0 and got["l2re"] < got["l2re_pretrained"]


def test_compression_cell_at_full_rank_reproduces_the_pretrained_errors(tmp_path):
    task = make(pde="poisson", problem="compression")
    ctx = make_ctx(tmp_path, budget=1.0, budget_kind=PARAM_RATIO)
    task.setup(ctx)

    class FullRank(UniformSelector):
        def select(self, problem):
            return {site.name: site.max_rank for site in problem.sites}

    run_cell(task, ctx, FullRank(), SVD())
    got = metrics(ctx)
    assert got["l2re"] == pytest.approx(got["l2re_pretrained"], rel=1e-9)


def test_zero_rank_adapters_leave_the_pretrained_network_unchanged(tmp_path):
    """Adapters trained a few steps and then cut to rank 0 give exactly the pretrained PINN's outputs."""
    from rankbench.kinds.adaptation import AdapterTrainer

    task = make(pde="poisson", source=1.0, target=2.0)
    ctx = make_ctx(tmp_path)
    pretrained = task.pretrained_model(ctx)
    model = copy.deepcopy(pretrained)
    factorization = LoRA(LoRA.Params(init_rank=2))
    adapters = factorization.attach(model, task.adaptation_sites(model), seed=0)
    trainer = AdapterTrainer(task, ctx, model, adapters, task.adaptation_settings(), factorization.params.orth_reg)
    trainer.train(5)
    grid, _ = task._test_set(ctx, task.target_problem())
    with torch.no_grad():
        assert not torch.equal(model(grid), pretrained(grid))
        trainer.truncate({name: 0 for name in adapters})
        torch.testing.assert_close(model(grid), pretrained(grid), rtol=0, atol=0)


@pytest.mark.parametrize("with_adapters", [False, True])
def test_lbfgs_after_adam_lowers_the_fine_tuning_loss(tmp_path, with_adapters):
    """PINNacle's second phase: the same cell with L-BFGS iterations after its Adam steps ends at a lower PINN loss
    on the target problem, for the full fine-tuning reference and for an adapter cell at its final ranks."""
    losses = {}
    for lbfgs in (0, 30):
        task = make(pde="poisson", source=1.0, target=2.0, steps=20, retrain_steps=5, finetune_lbfgs_steps=lbfgs)
        ctx = make_ctx(tmp_path, budget=4 if with_adapters else None,
                       budget_kind=RANK_TOTAL if with_adapters else None)
        task.setup(ctx)
        if with_adapters:
            run_cell(task, ctx, UniformSelector(), LoRA(LoRA.Params(init_rank=2)))
        else:
            run_cell(task, ctx)
        got = metrics(ctx)
        losses[lbfgs] = got["final_loss"]
        if with_adapters:
            assert got["rank_total"] <= 4
        train = [row for row in ctx.curve_rows if row["curve"] == "train_loss"]
        assert max(row["step"] for row in train) == 20 + lbfgs  # the L-BFGS phase ends the loss curve
    assert losses[30] < 0.5 * losses[0]
