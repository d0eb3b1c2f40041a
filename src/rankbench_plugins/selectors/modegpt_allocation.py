"""``modegpt-allocation``: MoDeGPT's global sparsity allocation -- Lin et al., "MoDeGPT: Modular Decomposition for
Large Language Model Compression", ICLR 2025 (``docs/algorithms.md#modegpt``). A selector for module factorizations
(``rankbench.kinds.modules``; ``modegpt``), compression kind, budget kind ``param_ratio``.

Global sparsity allocation (``modegpt-allocation``, the selector registered here). With the Block Influence
s_i = 1 - E_t cos(x_{i,t}, x_{i+1,t}) of each layer (ShortGPT), the paper solves
max Σ_i s_i (1 - φ_i) + ε H(φ) subject to mean φ_i = φ_avg, whose solution is

    φ = L φ_avg Softmax(-s / ε),

applied to every module of layer i. Here φ_avg = 1 - ``param_ratio``; a φ_i above its cap (1 minus the share of
the layer's smallest ranks: every module keeps one unit) is capped and the excess spread over the other layers in
proportion to their softmax weights (the box-constrained optimum of the same objective).
Each module of layer i then gets the largest rank whose exact cost is <= (1 - φ_i) of its dense cost, and the
parameters left by rounding are handed out one rank step at a time, to the module furthest below its share
first, while the next step fits: the total is at most the budget and below it by less than one step of any module
that could still grow.

Parameters (defaults): ``temperature`` ε = 0.1. Deviation: the authors tune ε per model (so that the largest
layer sparsity stays moderate); 0.1 is this plugin's default.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from rankbench.api import COMPRESSION, PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench.kinds.modules import ModuleFactorization


def allocate_sparsity(scores: np.ndarray, mean_sparsity: float, temperature: float,
                      caps: np.ndarray | None = None) -> np.ndarray:
    """φ = L φ_avg Softmax(-s/ε), with φ_i <= caps_i (default 1): capped layers stay at their cap and the rest of
    L φ_avg is spread over the others in proportion to their softmax weights."""
    scores = np.asarray(scores, dtype=np.float64)
    layers = len(scores)
    caps = np.ones(layers) if caps is None else np.asarray(caps, dtype=np.float64)
    logits = -scores / temperature
    weights = np.exp(logits - logits.max())
    total = layers * float(mean_sparsity)
    if total > caps.sum():
        raise ValueError(f"a mean sparsity of {mean_sparsity} exceeds what the layers can give ({caps.mean():.4f})")
    capped = np.zeros(layers, dtype=bool)
    while True:
        free = ~capped
        spread = (total - caps[capped].sum()) * weights / weights[free].sum() if free.any() else 0.0
        sparsity = np.where(capped, caps, spread)
        over = free & (sparsity > caps)
        if not over.any():
            return sparsity
        capped |= over


class ModeGPTAllocation(Selector):
    name = "modegpt-allocation"
    version = "1"
    description = ("MoDeGPT's global sparsity allocation: layer sparsity L φ_avg Softmax(-BI/ε) from Block "
                   "Influence, met exactly on the modules' parameter costs.")
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO})

    class Params(PluginParams):
        temperature: float = Field(0.1, gt=0.0, description="entropic regularisation ε of the allocation")

    def skip(self, task, factorization) -> str | None:
        if not isinstance(factorization, ModuleFactorization):
            return f"selector {self.name} allocates over transformer blocks; {factorization.name} is per weight"
        return None

    def select(self, problem: RankProblem) -> Ranks:
        if problem.budget_kind != PARAM_RATIO or problem.budget is None:
            raise ValueError(f"{self.name} needs a {PARAM_RATIO} budget, got {problem.budget_kind!r}")
        stats = problem.stats
        influence = np.asarray(stats.block_influence(), dtype=np.float64)
        dense, smallest = np.zeros(len(influence)), np.zeros(len(influence))
        for site in problem.sites:  # a layer can give up everything but the smallest rank of each module
            dense[stats.block_of(site.name)] += site.dense_params
            smallest[stats.block_of(site.name)] += site.params_at_rank(1)
        sparsity = allocate_sparsity(influence, max(0.0, 1.0 - float(problem.budget)), self.params.temperature,
                                     caps=1.0 - smallest / dense)
        shares = {site.name: (1.0 - sparsity[stats.block_of(site.name)]) * site.dense_params for site in problem.sites}
        return fill_budget(problem, shares)


def fill_budget(problem: RankProblem, shares: dict[str, float]) -> dict[str, int]:
    """Per site the largest rank whose cost is <= its share (at least the smallest rank); while that is above the
    budget (smallest ranks above a share), one rank step down at the site furthest above its share; then one rank
    step up at a time to the site furthest below its share, while the step fits the budget. Raises when even the
    smallest ranks do not fit."""
    limit = float(problem.budget) * problem.dense_params
    ranks, costs = {}, {}
    for site in problem.sites:
        rank = 1
        for k in range(1, int(site.max_rank) + 1):
            if site.params_at_rank(k) <= shares[site.name]:
                rank = k
        ranks[site.name], costs[site.name] = rank, int(site.params_at_rank(rank))
    spent = sum(costs.values())
    by_name = {site.name: site for site in problem.sites}
    while spent > limit:
        lower = {name: _previous_step(site, ranks[name]) for name, site in by_name.items()}
        lower = {name: step for name, step in lower.items() if step is not None}
        if not lower:
            raise ValueError(f"the smallest ranks cost {spent} parameters, above the budget {limit:.0f}")
        name = max(lower, key=lambda n: (costs[n] - shares[n]) / by_name[n].dense_params)
        ranks[name], cost = lower[name]
        spent += cost - costs[name]
        costs[name] = cost
    while True:
        steps = {}
        for name, site in by_name.items():
            step = _next_step(site, ranks[name])
            if step is not None and spent + step[1] - costs[name] <= limit:
                steps[name] = step
        if not steps:
            return ranks
        name = max(steps, key=lambda n: (shares[n] - costs[n]) / by_name[n].dense_params)
        ranks[name], cost = steps[name]
        spent += cost - costs[name]
        costs[name] = cost


def _previous_step(site, rank: int) -> tuple[int, int] | None:
    """The largest rank that costs less than ``rank``, and its cost; None at the bottom."""
    current = site.params_at_rank(rank)
    for k in range(rank - 1, 0, -1):
        cost = int(site.params_at_rank(k))
        if cost < current:
            return k, cost
    return None


def _next_step(site, rank: int) -> tuple[int, int] | None:
    """The next rank that costs more than ``rank`` (feasible ranks only), and its cost; None at the top."""
    current = site.params_at_rank(rank)
    for k in range(rank + 1, int(site.max_rank) + 1):
        cost = int(site.params_at_rank(k))
        if cost > current:
            return k, cost
    return None



@hookimpl
def rankbench_register_selectors(register):
    register(ModeGPTAllocation)
