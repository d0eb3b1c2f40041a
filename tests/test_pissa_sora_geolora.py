"""``lora``'s PiSSA initialisation (against PEFT), ``sora``'s proximal gate step and ``geolora``'s integrator.

Planted problem: a single Linear 10 -> 8 (float64) whose target adds a planted rank-2 update (singular values 2 and
1) to its weight; the loss is the squared error summed over outputs, averaged over 256 fixed inputs, so the best
update is exactly the planted one (rank 2) and the loss can reach 0.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rankbench.api import ADAPTATION, RANK_TOTAL
from rankbench.context import CellContext
from rankbench.kinds.adaptation import AdaptationSettings, AdaptationTask, AdapterTrainer, run_adaptation
from rankbench_plugins.factorizations.lora import LoRA
from rankbench_plugins.selectors import geolora, sora

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PLANTED = 2
CAPACITY = 5


class LinearPlanted(AdaptationTask):
    def __init__(self, steps: int = 300, lr: float = 0.05):
        gen = torch.Generator().manual_seed(0)
        self.model = nn.Sequential(nn.Linear(10, 8)).double()
        with torch.no_grad():
            self.model[0].weight.copy_(torch.randn(8, 10, generator=gen, dtype=torch.float64))
        U = torch.linalg.qr(torch.randn(8, PLANTED, generator=gen, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(10, PLANTED, generator=gen, dtype=torch.float64))[0]
        self.delta = (U * torch.linspace(2.0, 1.0, PLANTED, dtype=torch.float64)) @ V.T
        self.x = torch.randn(256, 10, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            self.y = self.model(self.x) + self.x @ self.delta.T
        self.steps, self.lr = steps, lr

    def pretrained_model(self, ctx):
        return self.model

    def adaptation_sites(self, model):
        return ["0"]

    def training_loss(self, ctx, model):
        return ((model(self.x) - self.y) ** 2).sum(dim=1).mean()

    def evaluate_adapted(self, ctx, model):
        with torch.no_grad():
            ctx.metric("loss", float(self.training_loss(ctx, model)))

    def adaptation_settings(self):
        return AdaptationSettings(steps=self.steps, retrain_steps=1, lr=self.lr, reference_lr=self.lr)


def make_ctx() -> CellContext:
    return CellContext(cell_id="t", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=RANK_TOTAL,
                       shared={}, cache_dir=Path("."))


def make(module, **params):
    registered = []
    module.rankbench_register_selectors(registered.append)
    (cls,) = registered
    return cls(cls.Params(**params))


def lora(**params) -> LoRA:
    return LoRA(LoRA.Params(init_rank=CAPACITY, alpha=float(CAPACITY), **params))


def run_cell(selector, task, factorization):
    ctx = make_ctx()
    run_adaptation(task, ctx, selector, factorization)
    ranks = {row["site"]: row["rank"] for row in ctx.ranks_rows}
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    return ranks, metrics


def trainer_for(task, factorization):
    model = copy.deepcopy(task.model)
    adapters = factorization.attach(model, task.adaptation_sites(model), seed=0)
    return AdapterTrainer(task, make_ctx(), model, adapters, task.adaptation_settings(), factorization.params.orth_reg)


# --------------------------------------------------------------------------------------------------------------
# PiSSA


def test_pissa_default_init_unchanged_and_declared():
    assert LoRA.Params().init == "gaussian"
    assert LoRA(LoRA.Params()).problem_kinds == {ADAPTATION}


def test_pissa_adapters_and_residual_agree_with_peft():
    """PEFT's ``init_lora_weights="pissa"`` on the same two-Linear network: our update scaling P diag(E) Q equals
    PEFT's scaling B A, our frozen residual equals PEFT's base weight, both add up to W0, and P, Q are orthonormal."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    r, alpha = 3, 6.0
    gen = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))  # PEFT's PiSSA refuses float64
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours = copy.deepcopy(base).double()
    originals = {name: ours.get_submodule(name).weight.detach().clone() for name in ("0", "2")}
    adapters = LoRA(LoRA.Params(init_rank=r, alpha=alpha, init="pissa")).attach(ours, ["0", "2"], seed=0)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="pissa",
                                                 target_modules=["0", "2"], lora_dropout=0.0))
    for name, adapter in adapters.items():
        layer = peft_model.base_model.model.get_submodule(name)
        peft_update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        with torch.no_grad():
            ours_update = adapter.delta_weight()
            # PEFT runs the SVD in float32: agreement to float32 round-off
            torch.testing.assert_close(ours_update, peft_update.double(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(adapter.base.weight, layer.base_layer.weight.double(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(adapter.base.weight + ours_update, originals[name], rtol=0, atol=1e-12)
            eye = torch.eye(r, dtype=torch.float64)
            torch.testing.assert_close(adapter.P.T @ adapter.P, eye)
            torch.testing.assert_close(adapter.Q @ adapter.Q.T, eye)
            s = torch.linalg.svdvals(originals[name])
            torch.testing.assert_close(adapter.E * adapter.scaling, s[:r])  # E carries the principal values
            # the residual holds exactly the trailing singular values
            torch.testing.assert_close(torch.linalg.svdvals(adapter.base.weight)[: len(s) - r], s[r:])
    x = torch.randn(5, 6, generator=gen)
    with torch.no_grad():  # both adapted models are still the pretrained one
        torch.testing.assert_close(ours(x.double()), peft_model(x).double(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# SoRA


def test_soft_threshold_closed_form():
    z = torch.tensor([-2.0, -0.3, -0.1, 0.0, 0.05, 0.2, 1.5], dtype=torch.float64)
    expected = np.sign(z.numpy()) * np.maximum(np.abs(z.numpy()) - 0.2, 0.0)
    np.testing.assert_array_equal(sora.soft_threshold(z, 0.2).numpy(), expected)
    assert sora.soft_threshold(z, 0.2).tolist() == [-1.8, -0.09999999999999998, 0.0, 0.0, 0.0, 0.0, 1.3]


def test_proximal_gate_step_equals_adam_then_soft_threshold():
    """One trainer step with SoRA's callback: E ends at T_xi(Adam step of E), Adam's step written out in numpy from
    the gradient of the loss at the starting parameters; gates whose |Adam-updated value| <= xi are exactly 0."""
    task = LinearPlanted(lr=0.05)
    trainer = trainer_for(task, lora())
    adapter = trainer.adapters["0"]
    with torch.no_grad():
        adapter.E.copy_(torch.tensor([0.3, -0.06, 0.04, -0.5, 0.01], dtype=torch.float64))
    trainer.optimizer = trainer._new_optimizer()
    params = [adapter.P, adapter.E, adapter.Q]
    loss = task.training_loss(None, trainer.model) + trainer.orth_reg * trainer.regulariser()
    grad_E = torch.autograd.grad(loss, params)[1].numpy()
    E0 = adapter.E.detach().numpy().copy()
    xi = 0.06  # Adam's first step moves every entry by about lr = 0.05: the gate at 0.01 lands within xi
    trainer.step(after=sora.GateProximalStep([xi], trainer.total_steps))
    lr, (b1, b2), eps = 0.05, (0.9, 0.999), 1e-8
    m, v = (1 - b1) * grad_E, (1 - b2) * grad_E**2
    adam = E0 - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    expected = np.sign(adam) * np.maximum(np.abs(adam) - xi, 0.0)
    np.testing.assert_allclose(adapter.E.detach().numpy(), expected, rtol=1e-12, atol=1e-15)
    assert ((np.abs(adam) <= xi) == (adapter.E.detach().numpy() == 0)).all()
    assert (adapter.E.detach().numpy() == 0).any()  # the first step already zeroes a gate


def test_threshold_schedule_phases():
    step = sora.GateProximalStep(sora.linear_thresholds(1e-3, 5e-3, 5), total_steps=100)
    assert [step.threshold(t) for t in (1, 20, 21, 60, 100)] == pytest.approx([1e-3, 1e-3, 2e-3, 3e-3, 5e-3])
    with pytest.raises(ValueError, match="max_threshold"):
        sora.SoRASelector.Params(threshold_schedule="linear")


def test_sora_gates_shrink_to_the_planted_rank(monkeypatch):
    counts = []
    original = sora.GateProximalStep.__call__

    def recording(self, trainer):
        original(self, trainer)
        counts.append(sora.nonzero_gates(trainer))

    monkeypatch.setattr(sora.GateProximalStep, "__call__", recording)
    ranks, metrics = run_cell(make(sora, threshold=0.01), LinearPlanted(steps=400), lora())
    assert ranks == {"0": PLANTED} and metrics["rank_total"] == PLANTED
    assert counts[0] == CAPACITY and counts[-1] == PLANTED
    assert min(counts[len(counts) // 2:]) >= PLANTED  # never below the planted rank in the second half
    assert metrics["loss"] < 0.01  # the planted update is fitted (initial loss ~5)


def test_sora_uses_no_budget_and_prunes_only_zero_gates():
    selector = make(sora)
    assert not selector.uses_budget(RANK_TOTAL)
    with pytest.raises(TypeError, match="adapt"):
        selector.select(None)
    task = LinearPlanted(steps=20)
    trainer = trainer_for(task, lora())
    ranks = selector.adapt(None, trainer)
    adapter = trainer.adapters["0"]
    assert ranks["0"] == int((adapter.E != 0).sum()) == adapter.rank
    assert bool((adapter.mask[adapter.E == 0] == 0).all())


# --------------------------------------------------------------------------------------------------------------
# GeoLoRA


def test_tail_rank_rule():
    from rankbench.kinds.layers import tail_rank

    d = torch.tensor([3.0, 1.0, 0.3, 0.1], dtype=torch.float64)
    norm = float(torch.linalg.norm(d))
    assert tail_rank(d, 0.15) == 2  # ||(0.3, 0.1)|| = 0.316 < 0.15 * 3.18 = 0.477; ||(1, .3, .1)|| is not
    assert tail_rank(d, 0.0) == 4
    assert tail_rank(d, 0.99) == 1 and 1.0 < 0.99 * norm


def test_geolora_step_against_the_full_gradient():
    """One step at rank 2 with e != 0: the gradients read from P, Q, E equal scaling G V, scaling G^T U and
    scaling U^T G V for G = dL/d(dW) by autograd on dW; with tau = 0 the new update is scaling U_hat S_hat V_hat^T of
    the parallel integrator written out independently (K1 = U S - h G_K, L1 = V S^T - h G_L), in orthonormal bases."""
    task = LinearPlanted()
    trainer = trainer_for(task, lora())
    adapter = trainer.adapters["0"]
    geolora.start_factors(adapter, 2)
    with torch.no_grad():
        adapter.E[:2] = torch.tensor([0.7, 0.2], dtype=torch.float64)
    A = adapter.scaling
    U, V, e = adapter.P[:, :2].detach().clone(), adapter.Q[:2].T.detach().clone(), adapter.E[:2].detach().clone()
    dW = (A * (U * e) @ V.T).requires_grad_(True)
    W0 = adapter.base.weight.detach()
    G = torch.autograd.grad(((task.x @ (W0 + dW).T + adapter.base.bias.detach() - task.y) ** 2).sum(1).mean(), dW)[0]
    loss = task.training_loss(None, trainer.model)
    loss.backward()
    G_K, G_L, G_S = geolora.core_gradients(adapter, 2)
    torch.testing.assert_close(G_K, A * G @ V)
    torch.testing.assert_close(G_L, A * G.T @ U)
    torch.testing.assert_close(G_S, A * U.T @ G @ V)
    h = 0.05
    geolora.geolora_step(adapter, geolora.SGDSteps(h), tau=0.0, rank_min=1)
    assert adapter.rank == 4  # augmented to 2r, nothing truncated at tau 0
    # the parallel integrator's new core, written out independently
    Ut = torch.linalg.qr(torch.cat([U, G_K], 1))[0][:, 2:4]
    Vt = torch.linalg.qr(torch.cat([V, G_L], 1))[0][:, 2:4]
    Ub, Vb = torch.cat([U, Ut], 1), torch.cat([V, Vt], 1)
    S_hat = torch.zeros(4, 4, dtype=torch.float64)
    S_hat[:2, :2] = torch.diag(e) - h * G_S
    S_hat[2:, :2] = Ut.T @ (U * e - h * G_K)
    S_hat[:2, 2:] = (V * e - h * G_L).T @ Vt
    torch.testing.assert_close(adapter.delta_weight(), A * Ub @ S_hat @ Vb.T)
    P, Q = adapter.P[:, :4], adapter.Q[:4]
    torch.testing.assert_close(P.T @ P, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(Q @ Q.T, torch.eye(4, dtype=torch.float64))
    assert (adapter.E[:4].diff() <= 0).all()


def test_adam_steps_equal_torch_adam_on_a_fixed_block():
    """``optimizer: adam``: on a block of constant shape the step equals torch.optim.Adam's parameter change."""
    gen = torch.Generator().manual_seed(1)
    steps = geolora.AdamSteps(0.01)
    param = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([param], lr=0.01)
    for _ in range(3):
        grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        before = param.detach().clone()
        param.grad = grad.clone()
        adam.step()
        torch.testing.assert_close(steps(("site", "K"), grad, (4, 3)), before - param.detach())


def test_geolora_bases_move_at_full_capacity():
    """At rank = capacity the bases are still augmented (to 2r) before the truncation back to the capacity, so they
    rotate (the authors' code clips the augmentation at the maximal rank and would leave them fixed)."""
    task = LinearPlanted()
    trainer = trainer_for(task, LoRA(LoRA.Params(init_rank=2, alpha=2.0)))
    adapter = trainer.adapters["0"]
    geolora.start_factors(adapter, 2)
    with torch.no_grad():
        adapter.E[:2] = torch.tensor([0.5, 0.3], dtype=torch.float64)
    U_old = adapter.P.detach().clone()
    task.training_loss(None, trainer.model).backward()
    assert geolora.geolora_step(adapter, geolora.SGDSteps(0.05), tau=0.0, rank_min=1) == 2
    U_new = adapter.P.detach()
    assert float(torch.linalg.norm(U_new - U_old @ (U_old.T @ U_new))) > 1e-3  # left the old span
    torch.testing.assert_close(U_new.T @ U_new, torch.eye(2, dtype=torch.float64))


def test_geolora_rank_converges_to_the_planted_rank():
    """From the full capacity (5) down to the planted rank 2. (Not with ``init: pissa``: there the adapter also
    holds W0's principal part, so the best adapter update is no longer of the planted rank.)"""
    ranks, metrics = run_cell(make(geolora, rank_min=1), LinearPlanted(steps=200), lora())
    assert ranks == {"0": PLANTED} and metrics["rank_total"] == PLANTED
    assert metrics["loss"] < 1e-8  # the planted update is recovered exactly


def test_geolora_uses_no_budget():
    selector = make(geolora)
    assert not selector.uses_budget(RANK_TOTAL)
    p = selector.params
    assert (p.tau, p.lr, p.rank_min, p.start_rank, p.optimizer) == (0.15, None, 2, None, "sgd")
    with pytest.raises(TypeError, match="adapt"):
        selector.select(None)

