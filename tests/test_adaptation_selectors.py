"""The adaptation mode of ``adalora`` and ``sublora``: AdaLoRA's budget schedule and EMA scores, SubLoRA's
post-hoc and joint determinations, budgets through ``run_adaptation``, and a planted low-rank update.

The toy task: a pretrained 5 -> 8 -> 3 tanh MLP (float64) and a target that is the same network with a planted
rank-2 update on one of its two Linears (``"0"`` or ``"2"``); the training loss is the mean squared error to the
target network's outputs on 64 fixed inputs. Only the planted site needs adapter rank.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rankbench.api import ADAPTATION, COMPRESSION, PARAM_RATIO, RANK_TOTAL, RankProblem
from rankbench.context import CellContext
from rankbench_plugins.factorizations.lora import LoRA
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.factorizations.tucker import Tucker
from rankbench.kinds.adaptation import (
    AdaptationSettings,
    AdapterTrainer,
    AdaptationTask,
    SVDAdapter,
    adapter_site,
    mask_components,
    run_adaptation,
)
from rankbench_plugins.selectors import adalora, sublora
from rankbench_plugins.selectors._allocation import (
    budget_schedule,
    kind_budget_skip,
    project_submodular,
    schedule_steps,
    submodular_value,
)


INIT_RANK = 3
SITES = ("0", "2")
N = INIT_RANK * len(SITES)  # components in all


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class PlantedTask(AdaptationTask):
    """Pretrained MLP; the target adds 0.5 u v^T (rank ``planted``) to the weight of Linear ``site``."""

    def __init__(self, site: int = 0, planted: int = 2, steps: int = 120, retrain: int = 30, lr: float = 0.05):
        self.steps, self.retrain, self.lr = steps, retrain, lr
        gen = torch.Generator().manual_seed(0)
        self.model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
        target = copy.deepcopy(self.model)
        with torch.no_grad():
            W = target[site].weight
            u = torch.randn(W.shape[0], planted, generator=gen, dtype=torch.float64)
            v = torch.randn(planted, W.shape[1], generator=gen, dtype=torch.float64)
            W += 0.5 * u @ v
            self.y = target(self.x)
        self.adapted = None

    def pretrained_model(self, ctx):
        return self.model

    def adaptation_sites(self, model):
        return list(SITES)

    def training_loss(self, ctx, model):
        return ((model(self.x) - self.y) ** 2).mean()

    def evaluate_adapted(self, ctx, model):
        self.adapted = model
        with torch.no_grad():
            ctx.metric("mse", float(self.training_loss(ctx, model)))

    def adaptation_settings(self):
        return AdaptationSettings(steps=self.steps, retrain_steps=self.retrain, lr=self.lr, reference_lr=self.lr)


def make_ctx(budget, seed: int = 0) -> CellContext:
    return CellContext(
        cell_id="t", seed=seed, task_seed=0, device="cpu", budget=budget, budget_kind=RANK_TOTAL, shared={},
        cache_dir=Path("."),
    )


def lora() -> LoRA:
    return LoRA(LoRA.Params(init_rank=INIT_RANK))


def make(module, **params):
    registered = []
    module.rankbench_register_selectors(registered.append)
    (cls,) = registered
    return cls(cls.Params(**params))


def run_cell(selector, budget, task=None, seed: int = 0):
    task = task or PlantedTask()
    ctx = make_ctx(budget, seed)
    run_adaptation(task, ctx, selector, lora())
    ranks = {row["site"]: row["rank"] for row in ctx.ranks_rows}
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    return ranks, metrics, task


def manual_cell(task, budget, seed: int = 0):
    """What ``run_adaptation`` builds before it hands over to a selector: (problem, trainer)."""
    ctx = make_ctx(budget, seed)
    model = copy.deepcopy(task.pretrained_model(ctx))
    factorization = lora()
    adapters = factorization.attach(model, task.adaptation_sites(model), seed=seed)
    trainer = AdapterTrainer(task, ctx, model, adapters, task.adaptation_settings(), factorization.params.orth_reg)
    problem = RankProblem(
        sites=[adapter_site(name, a) for name, a in adapters.items()], budget=budget, budget_kind=RANK_TOTAL, seed=seed
    )
    return problem, trainer


# --------------------------------------------------------------------------------------------------------------
# Registration, parameters, pairing


@pytest.mark.parametrize("module", [adalora, sublora])
def test_kinds_declared_and_mismatched_budgets_skipped(module):
    selector = make(module)
    if module is sublora:
        assert type(selector).problem_kinds == {COMPRESSION, ADAPTATION}
        assert type(selector).budget_kinds == {PARAM_RATIO, RANK_TOTAL}
    else:  # AdaLoRA needs training steps; its one-gradient compression score is taylor-sensitivity
        assert type(selector).problem_kinds == {ADAPTATION} and type(selector).budget_kinds == {RANK_TOTAL}
        with pytest.raises(TypeError, match="taylor-sensitivity"):
            selector.select(RankProblem(sites=[], budget=0.5, budget_kind=PARAM_RATIO, seed=0))
    for kind, budget_kind, skipped in [
        (ADAPTATION, RANK_TOTAL, False),
        (ADAPTATION, PARAM_RATIO, True),
        (COMPRESSION, PARAM_RATIO, False),
        (COMPRESSION, RANK_TOTAL, True),
    ]:
        if kind not in type(selector).problem_kinds:
            continue
        task = SimpleNamespace(problem_kind=kind, budget_kind=budget_kind)
        factorization = lora() if kind == ADAPTATION else SVD()
        assert bool(selector.skip(task, factorization)) == skipped
        assert bool(kind_budget_skip(selector, task)) == skipped
    if module is sublora:  # compression with a factorization that has no SVD-form decomposition (a tensor format)
        assert selector.skip(SimpleNamespace(problem_kind=COMPRESSION, budget_kind=PARAM_RATIO), Tucker())
    with pytest.raises(ValueError, match="tinit_fraction"):
        type(selector).Params(tinit_fraction=0.8, tfinal_fraction=0.3)
    problem, trainer = manual_cell(PlantedTask(steps=4), 2)
    problem.budget_kind = PARAM_RATIO
    with pytest.raises(ValueError, match="rank_total"):
        selector.adapt(problem, trainer)
    assert trainer.step_count == 0


def test_new_parameter_defaults():
    a = adalora.AdaLoraSelector.Params()
    assert (a.beta1, a.beta2, a.tinit_fraction, a.tfinal_fraction, a.delta_t) == (0.85, 0.85, 0.1, 0.3, 10)
    s = sublora.SubLoraSelector.Params()
    assert (s.mode, s.retrain_fraction, s.tinit_fraction, s.tfinal_fraction, s.determinations, s.schedule) == (
        "posthoc", None, 0.1, 0.3, 10, "cubic")
    assert s.fill is False  # the greedy stops at a non-positive gain unless asked to fill the budget


# --------------------------------------------------------------------------------------------------------------
# AdaLoRA: budget schedule and scores


def test_budget_schedule_equals_the_cubic_formula():
    T, b0, bT, tinit, tfinal = 100, 12, 4, 10, 30

    def formula(t):  # written out by hand from the paper / PEFT
        return int((b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit)) ** 3 + bT)

    # Hand values: t=11: 8 (59/60)^3 + 4 = 11.606; t=20: 8 (5/6)^3 + 4 = 8.63; t=40: 8/8 + 4 = 5; t=70: 4.
    expected = {0: 12, 5: 12, 10: 12, 11: 11, 20: 8, 40: 5, 69: 4, 70: 4, 71: 4, 100: 4}
    for t, b in expected.items():
        assert budget_schedule(t, T, b0, bT, tinit, tfinal) == b, t
    for t in range(tinit + 1, T - tfinal + 1):
        assert budget_schedule(t, T, b0, bT, tinit, tfinal) == formula(t), t
    values = [budget_schedule(t, T, b0, bT, tinit, tfinal) for t in range(T + 1)]
    assert values[0] == b0 and values[-1] == bT
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert adalora.budget_schedule is budget_schedule
    # No division by zero when the middle phase is empty.
    assert [budget_schedule(t, 10, 6, 2, 7, 3) for t in (7, 8)] == [6, 2]
    # Steps from fractions: tinit, tfinal and the final determination's step T - tfinal, clipped to [1, T].
    assert schedule_steps(100, 0.1, 0.3) == (10, 30, 70)
    assert schedule_steps(5, 0.1, 1.0) == (1, 5, 1)
    assert schedule_steps(0, 0.1, 0.3) == (0, 0, 0)


def small_adapter(seed: int = 0) -> SVDAdapter:
    base = nn.Linear(2, 3).double()
    adapter = SVDAdapter(base, rank=2, alpha=2.0, init_std=0.5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        adapter.E.copy_(torch.tensor([2.0, -1.0], dtype=torch.float64))
    return adapter


def set_grads(adapter, gE, gP, gQ):
    adapter.E.grad = torch.tensor(gE, dtype=torch.float64)
    adapter.P.grad = torch.tensor(gP, dtype=torch.float64)
    adapter.Q.grad = torch.tensor(gQ, dtype=torch.float64)


def at_step(step: int):
    """What a RankAllocator reads of the trainer: the step count (and where it records determinations)."""
    return SimpleNamespace(step_count=step, mark_determination=lambda **extra: None)


def allocator_for(adapters, score="triplet", beta1=0.85, beta2=0.85, **kw):
    args = dict(target=1, total_steps=100, tinit=50, tfinal=10, t_end=90, delta_t=1)
    args.update(kw)
    return adalora.RankAllocator(adapters, beta1=beta1, beta2=beta2, score=score, **args)


def test_ema_scores_after_two_callbacks_by_hand():
    # Singular score, worked by hand (beta1 = beta2 = 0.85): E = (2, -1); grads (0.5, 1) then (1, 0).
    # I1 = (1, 1); Ibar1 = .15 I1 = (.15, .15); Ubar1 = .15 * .85 = .1275.
    # I2 = (2, 0); Ibar2 = (.1275 + .3, .1275) = (.4275, .1275); Ubar2 = (.108375 + .15 * 1.5725, .108375 + .15 * .1275)
    # = (.34425, .1275); s = Ibar2 * Ubar2 = (.147166875, .01625625).
    adapter = small_adapter()
    allocator = allocator_for({"a": adapter}, score="singular")
    zeros_P, zeros_Q = np.zeros((3, 2)), np.zeros((2, 2))
    for step, gE in [(1, [0.5, 1.0]), (2, [1.0, 0.0])]:
        set_grads(adapter, gE, zeros_P, zeros_Q)
        allocator(at_step(step))
    np.testing.assert_allclose(allocator.scores().numpy(), [0.147166875, 0.01625625], rtol=1e-12)
    assert adapter.E.tolist() == [2.0, -1.0] and adapter.rank == 2  # warm-up: nothing masked

    # Triplet score with P and Q gradients and different betas, against the recursion written out in numpy.
    b1, b2 = 0.8, 0.6
    adapter = small_adapter(1)
    allocator = allocator_for({"a": adapter}, beta1=b1, beta2=b2)
    rng = np.random.default_rng(0)
    grads = [(rng.normal(size=2), rng.normal(size=(3, 2)), rng.normal(size=(2, 2))) for _ in range(2)]
    values = {k: getattr(adapter, k).detach().numpy().copy() for k in "EPQ"}
    ibar = {k: np.zeros_like(v) for k, v in values.items()}
    ubar = {k: np.zeros_like(v) for k, v in values.items()}
    for step, (gE, gP, gQ) in enumerate(grads, start=1):
        set_grads(adapter, gE, gP, gQ)
        allocator(at_step(step))
        for k, g in zip("EPQ", (gE, gP, gQ)):
            sens = np.abs(values[k] * g)
            ibar[k] = b1 * ibar[k] + (1 - b1) * sens
            ubar[k] = b2 * ubar[k] + (1 - b2) * np.abs(sens - ibar[k])
    s = {k: ibar[k] * ubar[k] for k in "EPQ"}
    expected = s["E"] + s["P"].mean(axis=0) + s["Q"].mean(axis=1)  # P's column i (out entries), Q's row i (in)
    np.testing.assert_allclose(allocator.scores().numpy(), expected, rtol=1e-12)


def test_masking_to_budget_and_final_mask():
    adapters = {"a": small_adapter(0), "b": small_adapter(1)}
    for a in adapters.values():
        with torch.no_grad():
            a.E.copy_(torch.tensor([1.0, 2.0], dtype=torch.float64))
    allocator = allocator_for(adapters, score="singular", target=1)
    scores = {"a": [0.4, 0.1], "b": [0.3, 0.2]}
    for name, values in scores.items():  # s(E) = Ibar * Ubar = values
        allocator.ema.ibar[(name, "E")] = torch.tensor(values, dtype=torch.float64)
        allocator.ema.ubar[(name, "E")] = torch.ones(2, dtype=torch.float64)
    allocator.mask_to_budget(2)  # k = 4 - 2: thr = 0.2, E := 0 where S <= 0.2, masks untouched
    assert adapters["a"].E.tolist() == [1.0, 0.0] and adapters["b"].E.tolist() == [1.0, 0.0]
    assert adapters["a"].rank == adapters["b"].rank == 2
    allocator.finalise()  # keep the single best triplet (a, 0) for good
    assert adapters["a"].mask.tolist() == [1.0, 0.0] and adapters["b"].mask.tolist() == [0.0, 0.0]
    assert adapters["b"].E.tolist() == [0.0, 0.0]


def test_adalora_schedule_drives_training(monkeypatch):
    made = []

    class Spy(adalora.RankAllocator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(adalora, "RankAllocator", Spy)
    T, budget = 60, 2
    selector = make(adalora, delta_t=5)
    problem, trainer = manual_cell(PlantedTask(steps=T), budget)
    ranks = selector.adapt(problem, trainer)
    (allocator,) = made
    tinit, tfinal, t_end = 6, 18, 42
    assert (allocator.tinit, allocator.tfinal, allocator.t_end) == (tinit, tfinal, t_end)
    assert trainer.step_count == t_end and trainer.steps_left == tfinal
    assert [t for t, _ in allocator.masked_at] == list(range(10, t_end, 5))
    assert all(b == budget_schedule(t, T, N, budget, tinit, tfinal) for t, b in allocator.masked_at)
    assert ranks == {name: a.rank for name, a in trainer.adapters.items()} and sum(ranks.values()) == budget
    assert all(r == N for step, r in trainer.rank_curve if step < t_end)  # intermediate masking zeroes E only
    trainer.train(trainer.steps_left)
    assert {name: a.rank for name, a in trainer.adapters.items()} == ranks  # masks stay fixed


# --------------------------------------------------------------------------------------------------------------
# Budgets through run_adaptation


@pytest.mark.parametrize(
    "module,params",
    [
        (adalora, {}),
        (adalora, {"score": "singular", "delta_t": 1}),
        (sublora, {}),
        (sublora, {"fill": True}),
        (sublora, {"mode": "joint", "fill": True}),
        (sublora, {"mode": "joint", "schedule": "constant"}),
        (sublora, {"hessian": "none", "fill": True}),
        (sublora, {"structure": "block", "top_k": 2}),
    ],
)
def test_total_rank_within_budget_through_run_adaptation(module, params):
    selector = make(module, **params)
    for budget in (1, 3, 5, N, N + 4):
        task = PlantedTask(steps=40, retrain=10)
        ranks, metrics, task = run_cell(selector, budget, task)  # run_adaptation checks answer == masks
        assert set(ranks) == set(SITES)
        assert sum(ranks.values()) == metrics["rank_total"] <= budget
        if module is adalora or params.get("fill"):  # else SubLoRA may stop below the budget (non-positive gain)
            assert sum(ranks.values()) == min(budget, N)
        for name, rank in ranks.items():
            adapter = task.adapted.get_submodule(name)
            assert adapter.rank == rank
            assert metrics["params"] >= adapter.params_at_rank(rank)


@pytest.mark.parametrize("module", [adalora, sublora])
def test_zero_budget_gives_the_pretrained_model(module):
    task = PlantedTask(steps=20, retrain=5)
    ranks, metrics, task = run_cell(make(module), 0, task)
    assert ranks == {"0": 0, "2": 0}
    with torch.no_grad():
        assert torch.equal(task.adapted(task.x), task.model(task.x))


def test_zero_rank_adapter_leaves_the_pretrained_output():
    task = PlantedTask()
    _, trainer = manual_cell(task, 3)
    trainer.train(15)
    adapter = trainer.adapters["0"]
    assert adapter.E.abs().min() > 0 and adapter.delta_weight().abs().max() > 0
    with torch.no_grad():
        x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        base = adapter.base(x)
        assert not torch.allclose(adapter(x), base)
        mask_components(adapter, torch.zeros(INIT_RANK, dtype=torch.bool))
        assert adapter.rank == 0
        assert torch.equal(adapter(x), base) and torch.count_nonzero(adapter.delta_weight()) == 0
        mask_components(trainer.adapters["2"], torch.zeros(INIT_RANK, dtype=torch.bool))
        assert torch.equal(trainer.model(task.x), task.model(task.x))
    trainer.train(5)  # no gradient revives a masked component
    assert adapter.rank == 0 and torch.count_nonzero(adapter.delta_weight()) == 0


# --------------------------------------------------------------------------------------------------------------
# SubLoRA


@pytest.mark.parametrize("mode", ["posthoc", "joint"])
@pytest.mark.parametrize("site", [0, 2])
def test_sublora_gives_the_planted_site_the_ranks(site, mode):
    for seed in (0, 1):
        ranks, metrics, _ = run_cell(make(sublora, mode=mode), 2, PlantedTask(site=site), seed=seed)
        assert ranks == {str(site): 2, str(2 - site): 0}, seed
        assert metrics["mse"] < 0.2


def finite_differences(f, x, h=1e-4):
    n = len(x)
    eye = torch.eye(n, dtype=torch.float64)
    g = np.array([(f(x + h * eye[i]) - f(x - h * eye[i])) / (2 * h) for i in range(n)])
    H = np.zeros((n, n))
    for i, j in itertools.product(range(n), repeat=2):
        a, b = h * eye[i], h * eye[j]
        H[i, j] = (f(x + a + b) - f(x + a - b) - f(x - a + b) + f(x - a - b)) / (4 * h * h)
    return g, H


def naive_greedy(c, M, b):
    """At most b items by largest marginal gain of F, stopping at the first non-positive best gain."""
    chosen = []
    for _ in range(b):
        gains = [(submodular_value([*chosen, i], c, M) - submodular_value(chosen, c, M), -i)
                 for i in range(len(c)) if i not in chosen]
        gain, i = max(gains)
        if gain <= 0:
            break
        chosen.append(-i)
    return chosen


def test_sublora_posthoc_uses_exact_derivatives_at_the_trained_E(monkeypatch):
    task, budget = PlantedTask(steps=50, retrain=20), 2
    selector = make(sublora, retrain_fraction=0.4)
    problem, trainer = manual_cell(task, budget)
    seen = []
    original = sublora.SubLoraSelector.adaptation_derivatives

    def recording(self, problem, trainer):
        out = original(self, problem, trainer)
        names = list(trainer.adapters)
        E = torch.cat([trainer.adapters[n].E.detach().clone() for n in names])

        def f(x):
            with torch.no_grad():
                return float(trainer.sigma_loss({n: x[INIT_RANK * g : INIT_RANK * (g + 1)] for g, n in enumerate(names)}))

        seen.append((trainer.step_count, E, out, finite_differences(f, E)))
        return out

    monkeypatch.setattr(sublora.SubLoraSelector, "adaptation_derivatives", recording)
    ranks = selector.adapt(problem, trainer)
    ((step, E, (sigma, g, offsets, blocks), (g_fd, H_fd)),) = seen
    assert step == 50 - 20 == trainer.step_count  # T - round(0.4 T) steps trained before the determination
    np.testing.assert_array_equal(sigma, E.numpy())
    assert list(offsets) == [0, 3, 6]
    np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-8)
    ((idx, H),) = blocks  # n = 6 <= full_max: one exact full Hessian
    assert list(idx) == list(range(N))
    np.testing.assert_allclose(H, H_fd, rtol=1e-4, atol=1e-6)
    # The kept set is the greedy on F with c = g E and M^ = projected diag(E) H diag(E), ...
    c, M = g * sigma, project_submodular(sigma[:, None] * H * sigma[None, :])
    kept = np.flatnonzero(np.concatenate([trainer.adapters[n].mask.numpy() for n in SITES]) > 0)
    assert sorted(naive_greedy(c, M, budget)) == list(kept)
    # ... here also the optimum over all sets of size b, and the masks/ranks match.
    best = max(itertools.combinations(range(N), budget), key=lambda S: submodular_value(list(S), c, M))
    assert submodular_value(list(kept), c, M) == pytest.approx(submodular_value(list(best), c, M), rel=1e-12)
    assert ranks == {n: int(trainer.adapters[n].mask.sum()) for n in SITES} and sum(ranks.values()) == budget


def test_sublora_retrain_steps_from_the_task_when_fraction_is_null():
    problem, trainer = manual_cell(PlantedTask(steps=30, retrain=12), 2)
    make(sublora, retrain_fraction=None).adapt(problem, trainer)
    assert trainer.step_count == 18 and trainer.rank_total() == 2


def test_sigma_zero_components_have_no_terms():
    sigma = np.array([1.5, 0.0, -2.0])
    g = np.array([0.3, 7.0, -0.2])
    H = np.array([[1.0, -2.0, 0.5], [-2.0, 3.0, 4.0], [0.5, 4.0, 2.0]])
    linear, ((idx, M),) = sublora.quadratic_model(sigma, g, [(np.arange(3), H)], "projected")
    assert linear[1] == 0.0 and np.all(M[1] == 0) and np.all(M[:, 1] == 0)
    # c = g sigma = (.45, 0, .4); M = diag(sigma) H diag(sigma): M_00 = 2.25, M_22 = 8, M_02 = -1.5 -> 0.
    np.testing.assert_allclose(linear, [-0.45 + 1.125, 0.0, -0.4 + 4.0])
    np.testing.assert_allclose(M, [[2.25, 0, 0], [0, 0, 0], [0, 0, 8.0]])


def test_sublora_joint_alternates_on_adalora_schedule(monkeypatch):
    T, budget = 60, 2
    selector = make(sublora, mode="joint", determinations=4, fill=True)
    problem, trainer = manual_cell(PlantedTask(steps=T), budget)
    calls = []
    original = sublora.SubLoraSelector.determine

    def recording(self, problem, trainer, b):
        keep = original(self, problem, trainer, b)
        calls.append((trainer.step_count, b, trainer.rank_total(), int(keep.sum())))
        return keep

    monkeypatch.setattr(sublora.SubLoraSelector, "determine", recording)
    ranks = selector.adapt(problem, trainer)
    tinit, tfinal, steps = selector.joint_steps(T)
    assert (tinit, tfinal) == (6, 18) and steps == [15, 24, 33, 42]  # 6 + round(j * 36 / 4)
    assert [c[0] for c in calls] == steps and trainer.step_count == 42
    expected = [budget_schedule(t, T, N, budget, tinit, tfinal) for t in steps]
    assert expected[-1] == budget and [c[1] for c in calls] == expected
    assert all(rank == N for _, _, rank, _ in calls)  # intermediate determinations zero E, masks stay on
    assert [c[3] for c in calls] == expected  # fill: exactly b(t) kept each time
    assert trainer.rank_total() == budget == sum(ranks.values())


def test_budget_at_least_the_components_keeps_everything_without_derivatives(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no derivatives needed")

    monkeypatch.setattr(sublora.SubLoraSelector, "adaptation_derivatives", fail)
    for selector in (make(adalora), make(sublora, fill=True)):  # sublora's default greedy may still stop earlier
        problem, trainer = manual_cell(PlantedTask(steps=10), N + 0.5)
        assert selector.adapt(problem, trainer) == {"0": INIT_RANK, "2": INIT_RANK}
        assert trainer.step_count == 0  # the protocol trains all steps
    assert math.floor(N + 0.5) == N


# --------------------------------------------------------------------------------------------------------------
# AdaLoRA against PEFT's AdaLoraModel / RankAllocator


def test_adalora_scores_and_masks_agree_with_peft():
    """The same tiny network, the same initial P, E, Q, the same data and optimiser: after every step the EMA'd
    sensitivity (Ibar) and uncertainty (Ubar) of every entry, the triplet scores and the intermediate masks (PEFT's
    ``update_and_allocate``) agree to round-off. At the final determination (t = T - tfinal) PEFT's
    ``update_and_allocate`` skips the score update that this selector (and the paper's algorithm) makes; the final
    kept set is compared with PEFT's own ``update_ipt`` + ``mask_to_budget`` at b_T, i.e. after the same update."""
    pytest.importorskip("peft")
    from peft import AdaLoraConfig, get_peft_model

    T, tinit, tfinal, delta_t, init_r, target_r, alpha = 24, 4, 8, 2, 3, 1, 2.0
    gen = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    ours_model = copy.deepcopy(base)
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                           total_step=T, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(SITES),
                           beta1=0.85, beta2=0.85, orth_reg_weight=0.0)
    torch.manual_seed(1)  # PEFT draws A and B from the global generator
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model  # AdaLoraModel
    allocator_p = inner.rankallocator
    layers = {name: inner.model.get_submodule(name) for name in SITES}
    adapters = {}
    for name, layer in layers.items():  # our adapters with PEFT's initial P (lora_B), E, Q (lora_A)
        adapter = SVDAdapter(ours_model.get_submodule(name), init_r, alpha, 0.02, torch.Generator())
        with torch.no_grad():
            adapter.P.copy_(layer.lora_B["default"])
            adapter.E.copy_(layer.lora_E["default"].view(-1))
            adapter.Q.copy_(layer.lora_A["default"])
        adapter.scaling = alpha / (init_r + 1e-5)  # PEFT's scaling / (ranknum + 1e-5)
        ours_model.set_submodule(name, adapter)
        adapters[name] = adapter
    with torch.no_grad():
        torch.testing.assert_close(ours_model(x), peft_model(x), rtol=1e-12, atol=1e-14)

    t_end = T - tfinal
    allocator = adalora.RankAllocator(adapters, target_r * len(SITES), T, tinit, tfinal, t_end, delta_t, 0.85, 0.85)
    peft_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    ours_params = [p for a in adapters.values() for p in (a.P, a.E, a.Q)]
    opt_p, opt_o = torch.optim.Adam(peft_params, lr=0.05), torch.optim.Adam(ours_params, lr=0.05)
    part = {"P": "lora_B", "E": "lora_E", "Q": "lora_A"}
    masked = 0
    for t in range(1, t_end + 1):
        for model, opt in ((peft_model, opt_p), (ours_model, opt_o)):
            opt.zero_grad(set_to_none=True)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        if t < t_end:
            inner.update_and_allocate(t)
        else:  # the paper's last step: update the scores, then keep b_T (PEFT's own pieces)
            allocator_p.update_ipt(inner.model)
            allocator_p.mask_to_budget(inner.model, target_r * len(SITES))
        allocator(at_step(t))
        for name, adapter in adapters.items():
            for ours_part, peft_part in part.items():
                key = f"{name}.{peft_part}.default"
                shape = getattr(adapter, ours_part).shape
                torch.testing.assert_close(allocator.ema.ibar[(name, ours_part)],
                                           allocator_p.exp_avg_ipt[key].view(shape), rtol=1e-9, atol=1e-15)
                torch.testing.assert_close(allocator.ema.ubar[(name, ours_part)],
                                           allocator_p.exp_avg_unc[key].view(shape), rtol=1e-9, atol=1e-15)
            alive_p = (layers[name].lora_E["default"].view(-1) != 0)
            alive_o = adapter.effective_e() != 0
            assert torch.equal(alive_o, alive_p), (t, name)
        if t < t_end:  # PEFT's triplet scores (its own combination) equal ours
            peft_scores = []
            for name in SITES:
                e = allocator_p._element_score(f"{name}.lora_E.default")
                a = allocator_p._element_score(f"{name}.lora_A.default").mean(dim=1, keepdim=True)
                b = allocator_p._element_score(f"{name}.lora_B.default").mean(dim=0).view(-1, 1)
                peft_scores.append(allocator_p._combine_ipt(e, torch.cat([a, b], dim=1)))
            torch.testing.assert_close(allocator.scores(), torch.cat(peft_scores), rtol=1e-9, atol=1e-15)
        masked += any(not bool((a.E != 0).all()) for a in adapters.values()) and t < t_end
    assert allocator.masked_at and masked  # intermediate masks were made (and compared) ...
    assert allocator.finalised and sum(a.rank for a in adapters.values()) == target_r * len(SITES)  # ... and the final


# --------------------------------------------------------------------------------------------------------------
# SubLoRA: the greedy stops at a non-positive gain; the joint schedule; rank-determination points


def test_sublora_determination_stops_at_a_non_positive_gain():
    """A planted loss exactly quadratic in E: L = a.(E - E0) + 1/2 (E - E0)^T H (E - E0); pruning component i moves
    E_i to 0, so F is known exactly. With a budget of all four components the greedy keeps only the two whose
    marginal gain stays positive; ``fill`` keeps all four."""
    adapters = {"a": small_adapter(0), "b": small_adapter(1)}
    E0 = torch.tensor([2.0, 1.0, -1.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        adapters["a"].E.copy_(E0[:2])
        adapters["b"].E.copy_(E0[2:])
    linear = np.array([1.5, -0.2, 0.7, -1.0])  # gains -c_i + M_ii / 2 with no pairwise terms but one
    d = np.array([0.5, 2.0, 1.0, 0.25])  # H_ii: M_ii = E_i^2 H_ii = (2, 2, 1, 2.25)
    e = E0.numpy()
    M_diag = e**2 * d
    c = 0.5 * M_diag - linear
    H = np.diag(d)
    H[0, 2] = H[2, 0] = 0.1 / (e[0] * e[2])  # M_02 = 0.1 >= 0: submodular, projection leaves it
    a, Ht = torch.as_tensor(c / e), torch.as_tensor(H)

    def sigma_loss(sigmas):
        delta = torch.cat([sigmas["a"], sigmas["b"]]) - E0
        return a @ delta + 0.5 * delta @ Ht @ delta

    marks = []
    trainer = SimpleNamespace(adapters=adapters, sigma_loss=sigma_loss,
                              mark_determination=lambda **extra: marks.append(extra))
    problem = RankProblem(sites=[adapter_site(n, ad) for n, ad in adapters.items()], budget=4,
                          budget_kind=RANK_TOTAL, seed=0)
    keep = make(sublora).determine(problem, trainer, 4)
    assert keep.tolist() == [True, False, True, False]
    M = e[:, None] * H * e[None, :]
    assert sorted(naive_greedy(c, M, 4)) == [0, 2]
    for i in (1, 3):  # what is left out has a non-positive marginal gain
        assert submodular_value([0, 2, i], c, M) - submodular_value([0, 2], c, M) <= 0
    assert make(sublora, fill=True).determine(problem, trainer, 4).tolist() == [True] * 4
    assert make(sublora).determine(problem, trainer, 1).tolist() == [True, False, False, False]
    # every determination is recorded with ||dL/dE|| of the derivatives used (here g = a at E0)
    assert marks[0]["sigma_grad_norm"] == pytest.approx(float(torch.linalg.norm(a)), rel=1e-12)


def test_sublora_joint_constant_schedule_uses_the_target_every_time(monkeypatch):
    T, budget = 60, 2
    selector = make(sublora, mode="joint", determinations=4, schedule="constant")
    problem, trainer = manual_cell(PlantedTask(steps=T), budget)
    budgets = []
    original = sublora.SubLoraSelector.determine

    def recording(self, problem, trainer, b):
        budgets.append((trainer.step_count, b))
        return original(self, problem, trainer, b)

    monkeypatch.setattr(sublora.SubLoraSelector, "determine", recording)
    selector.adapt(problem, trainer)
    assert budgets == [(15, 2), (24, 2), (33, 2), (42, 2)]
    assert trainer.rank_total() <= budget


def test_gradient_norms_at_each_determination_are_recorded():
    """Every determination point carries the last optimiser step's loss and gradient norms; they are the ones of the
    objective at the parameters that step started from (checked against autograd on a copy)."""
    task = PlantedTask(steps=30, retrain=10)
    problem, trainer = manual_cell(task, 2)
    trainer.train(12)
    params = [p for a in trainer.adapters.values() for p in (a.P, a.E, a.Q)]
    loss = task.training_loss(None, trainer.model)
    total = loss + trainer.orth_reg * trainer.regulariser()
    grads = torch.autograd.grad(total, params)
    expected = float(torch.sqrt(sum(g.square().sum() for g in grads)))
    expected_E = float(torch.sqrt(sum(g.square().sum() for p, g in zip(params, grads) if p.ndim == 1)))
    trainer.train(1)
    trainer.mark_determination(extra=1.5)
    (row,) = trainer.determinations
    assert row["step"] == 13 and row["extra"] == 1.5
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert row["grad_norm"] == pytest.approx(expected, rel=1e-10)
    assert row["grad_norm_E"] == pytest.approx(expected_E, rel=1e-10)  # the regulariser does not depend on E


@pytest.mark.parametrize(
    "module,params,steps",
    [
        (sublora, {}, [30]),  # posthoc: T - R
        (sublora, {"mode": "joint", "determinations": 3}, [12, 20, 28]),  # tinit 4 + round(j * 24 / 3)
        (adalora, {"delta_t": 5}, [5, 10, 15, 20, 25, 28]),  # masking steps after tinit, then the final one
        (None, {}, [30]),  # a post-hoc selector: the protocol marks the selection point
    ],
)
def test_determination_curves_through_run_adaptation(module, params, steps):
    from rankbench_plugins.selectors.uniform import UniformSelector

    selector = make(module, **params) if module else UniformSelector()
    ctx = make_ctx(2)
    run_adaptation(PlantedTask(steps=40, retrain=10), ctx, selector, lora())
    metrics = {m["metric"]: m["value"] for m in ctx.metrics}
    curves: dict[str, list] = {}
    for row in ctx.curve_rows:
        curves.setdefault(row["curve"], []).append((row["step"], row["value"]))
    names = ["loss_at_selection", "grad_norm_at_selection", "grad_norm_E_at_selection"]
    if module is sublora:
        names.append("sigma_grad_norm_at_selection")
    assert set(curves) == {"train_loss", "rank_total", *names}
    for name in names:
        assert [s for s, _ in curves[name]] == steps
        assert all(v > 0 for _, v in curves[name])
        assert metrics[name] == curves[name][-1][1]
