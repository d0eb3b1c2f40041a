"""``sublora``: second-order submodular rank allocation -- Gao & Tan, "Automatic Rank Determination for Low-Rank
Adaptation via Submodular Function Maximization" (2025, arXiv 2507.01841; not Lotfi et al.'s subspace LoRA);
``docs/algorithms.md#sublora``. Two problem kinds: ``adaptation`` (the paper's setting: ranks of LoRA adapters, budget
kind ``rank_total``; see "Adaptation" below) and ``compression`` (the same objective applied to post-training SVD
compression, budget kind ``param_ratio``). Any other (kind, budget kind) pair is skipped.

What could be checked against the paper. Only the paper's abstract and opening sections were readable here (the
arXiv HTML 2507.01841v1 and summaries of it); its method section was not. Confirmed: the loss change from pruning is
modelled by a second-order Taylor expansion in the concatenated singular values sigma, as a quadratic function of
the pruned index set S^- = [n] \\ S, minimised subject to |S| <= b (the paper's Eq. 7); the problem is rewritten as a
maximisation (its Eq. 9) and solved by a greedy with an approximation guarantee; there is a necessary and sufficient
submodularity condition and a closed-form projection of the Hessian; the joint variant alternates LoRA updates with
rank determination under the rank budget. Not confirmed (our derivation, below): the exact form of the objective
F, the condition (M_ij >= 0 off the diagonal), the projection (entry-wise clipping), the greedy's stopping rule and
the joint variant's schedule (a documented parameter, ``schedule``).

Objective. sigma in R^n concatenates the singular values of all sites -- for compression those of the sites'
decompositions (W_l = L_l diag(sigma_l) R_l, the factorization's ``decomposition``), for adaptation the adapters' E
(dW_l = scaling P_l diag(E_l * mask_l) Q_l, so n = sum of the initial ranks). g = dL/dsigma and H = d^2L/dsigma^2 are
those of the mean calibration loss at the dense model (compression, ``sigma_loss``) or of the training loss at the
current E (adaptation, ``AdapterTrainer.sigma_loss``: E replaced by sigma, masks applied, no regulariser), by
autograd. Pruning a set T of components moves sigma by -sigma * 1_T, and the second-order
Taylor expansion of the loss increase is, with c = g * sigma and M = diag(sigma) H diag(sigma),

    h(T) = -sum_{i in T} c_i + 1/2 sum_{i,j in T} M_ij .                                       (Eq. 7's objective)

Keeping S (pruning [n] \\ S) is scored by F(S) = h([n]) - h([n] \\ S) (F(empty) = 0), maximised under the budget.

Submodularity (checked). Write T = [n] \\ S. Adding i to S removes i from T, so the marginal gain is

    F(S + i) - F(S) = h(T) - h(T - i) = -c_i + 1/2 M_ii + sum_{j in T, j != i} M_ij        (M symmetric).

Adding another j != i to S first removes j from T, which changes this gain by exactly -M_ij: the second difference
F(S+i+j) - F(S+j) - F(S+i) + F(S) = -M_ij. F is submodular (diminishing returns) iff every second difference is
<= 0, i.e. iff M_ij >= 0 for all i != j (for sigma > 0: H_ij >= 0). F is moreover monotone iff every gain is >= 0;
with M_ij >= 0 the smallest gain of i is the one with T = {i}, so monotone iff -c_i + M_ii/2 >= 0 for all i.

Projection. M is replaced by the Frobenius-nearest matrix with non-negative off-diagonal entries. The constraint set
is a product of one interval per entry ([0, inf) off the diagonal, R on it), so the projection is entry-wise:
M^_ij = max(M_ij, 0) for i != j, M^_ii = M_ii (after symmetrising M against round-off). ``hessian: diagonal``
keeps only M_ii (F is then modular) and ``hessian: none`` only c (first order, no Hessian at all).

Greedy. Component i of a site of shape m x n costs m+n parameters (exactly: params_at_rank(count+1) -
params_at_rank(count)); budget rho * sum dense (``param_ratio``). Every site first keeps its leading component (at
least rank 1). ``greedy: ratio`` is the cost-benefit greedy: each step takes the affordable component with the
largest gain / cost. ``greedy: best`` (default) also runs the unit-cost greedy (largest gain) and keeps whichever
reaches the higher F -- the CELF rule of Leskovec et al. (KDD 2007), which guarantees >= (1 - 1/e)/2 of the optimum
for monotone submodular F under a knapsack constraint (the plain ratio greedy alone has no constant factor); under
a cardinality budget both are the classical (1 - 1/e) greedy. Both use lazy evaluation (exact, since with M^ >= 0
gains never increase). The greedy stops as soon as the best marginal gain is <= 0 (``fill: false``, default):
adding such a component cannot raise F, and since gains never increase no later one can either, so the budget is
an upper bound that need not be spent (a cell may keep fewer parameters, or components, than the budget allows).
``fill: true`` keeps adding components with non-positive gain until nothing more fits -- only for comparisons that
want every method at exactly the same budget; it is not the maximisation of F.

Which components are kept. With ``components: free`` (default) the greedy may select any components, and a site
keeps exactly those: for compression the answer is ``rankbench.kinds.compression.Components`` (the protocol
rebuilds the site from the selected components of its decomposition, not from the leading ones), for adaptation the
components outside the set are masked (``mask_components``). ``components: prefix`` (compression only) only lets
component i of a site in after component i-1, so the kept set is a prefix.

Hessian restriction (deviation). n = sum_l min(m_l, n_l) is far too large for a dense Hessian on an LLM.
``structure: full`` computes the exact Hessian over the leading ``top_k`` components of every site, cross-site
terms included; ``structure: block`` computes exact per-site blocks over each site's leading ``top_k`` components
(top_k Hessian-vector products per site, each a double backward through one retained graph of the calibration
loss over all sites) and sets cross-site terms to zero. Components beyond top_k are scored first order only (no M
terms). ``structure: auto`` (default) takes the exact full Hessian over all n components when n <= ``full_max``
(small models, tests), else ``block``. g is exact for every component. All derivatives of the compression path are
memoised per task configuration and factorization (``_allocation.memo``). With ``structure: block, top_k: 1`` (the
LLM suite, where one Hessian-vector product costs seconds on a CPU) the only second-order number per site is the
curvature of its leading component, which every site keeps anyway: that configuration is first order in effect.

Adaptation (``adapt``; budget b = floor(budget) components in total, each component costs 1 whatever its site).
The objective above with sigma = E: c = g * E, M^ = the projection of diag(E) H diag(E), and the unit-cost greedy
(cardinality budget, where the ratio and unit-cost greedies coincide; ``greedy`` is ignored) keeps S, |S| <= b,
stopping at a non-positive gain as above (``fill``); no site is forced to keep a component (a site may end at rank
0, its adapter then adds nothing). A component with E_i = 0 has c_i = 0 and a zero row of M^ (no first- or
second-order effect on the loss when pruned). Pruning is sigma_i := 0 for i not in S. ``structure`` as above with
n = sum of initial ranks (``auto``: the exact full Hessian when n <= ``full_max``, which covers PINN-sized adapters;
``block``: per-site blocks over the ``top_k`` components of largest |E_i|, as the adapters' components have no
order). ``components`` and ``calib_batches`` are compression only. Components already masked stay masked and are
not candidates. At every determination the trainer records the last step's loss and adapter gradient norms and
||dL/dE|| of the derivatives used (``AdapterTrainer.mark_determination``; curves ``*_at_selection``), so the
premise that the adapters are well optimised when ranks are determined is measured. Two modes (``mode``):

* ``posthoc`` (default): train T - R steps at the initial ranks, with R the task's retrain steps (the same as for
  every post-hoc selector; round(``retrain_fraction`` T) when that is set), determine S once at the trained E,
  switch the components outside S off for good (E := 0, mask := 0, ``mask_components``), and let the protocol
  train the last R steps with the masks fixed (the greedy run once at the fine-tuned sigma).
* ``joint``: the paper's joint variant, which alternates LoRA updates with rank determination under the rank
  budget. After tinit warm-up steps, ``determinations`` rank determinations D are evenly spaced over (tinit, T -
  tfinal] (t_j = tinit + round(j (T - tfinal - tinit) / D), j = 1..D, duplicates dropped), and the adapters train
  between two of them. Determination j recomputes g and H at the current E and keeps the greedy's set of at most
  b(t_j) components, zeroing E of the others without masking them, so they get gradients again and may revive (as
  AdaLoRA's intermediate masks do); the last one (t = T - tfinal, b = b_T) masks for good, and the protocol trains
  the remaining tfinal steps with the masks fixed. The paper's schedule could not be read, so b(t) is a parameter:
  ``schedule: cubic`` (default) borrows AdaLoRA's cubic decrease from the initial total rank to b_T
  (``_allocation.budget_schedule``, with AdaLoRA's tinit and tfinal defaults, so the two methods are comparable at
  equal steps); ``schedule: constant`` determines under the target budget b_T every time (the abstract's "under a
  rank budget constraint", read literally).

With ``fill: true`` and b >= the number of unmasked components nothing is pruned and no derivative is computed;
with the default the greedy runs even then, since it may stop before the budget binds. Nothing of the adaptation
path is memoised (E changes with training).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from rankbench.api import (
    ADAPTATION,
    COMPRESSION,
    PARAM_RATIO,
    RANK_TOTAL,
    PluginParams,
    RankProblem,
    Ranks,
    Selector,
    hookimpl,
)
from rankbench.kinds.adaptation import AdapterTrainer, mask_components
from rankbench_plugins.selectors._allocation import (
    budget_schedule,
    budgeted_greedy,
    component_layout,
    kind_budget_skip,
    needs_svd_form,
    memo,
    ones,
    param_limit,
    project_submodular,
    rank_total_limit,
    selection_answer,
    schedule_steps,
    site_params,
)

if TYPE_CHECKING:
    import torch


def gradient_and_hessian(loss_fn, x: torch.Tensor, blocks) -> tuple[np.ndarray, list[np.ndarray]]:
    """g = dL/dx (all entries, one backward) and, for every block (a list of indices of x), the Hessian block
    H[block][:, block]: one Hessian-vector product (a double backward through the same graph) per index."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    blocks = [list(b) for b in blocks]
    with torch.enable_grad():
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x, create_graph=any(blocks), allow_unused=True)
        if g is None:
            g = torch.zeros_like(x)
        out = []
        for rows in blocks:
            H = np.zeros((len(rows), len(rows)))
            if rows and g.requires_grad:
                index = torch.as_tensor(rows, device=x.device)
                for a, j in enumerate(rows):
                    (row,) = torch.autograd.grad(g[j], x, retain_graph=True, allow_unused=True)
                    if row is not None:
                        H[a] = row[index].detach().to(torch.float64).cpu().numpy()
            out.append(H)
    return g.detach().to(torch.float64).cpu().numpy(), out


def quadratic_model(sigma: np.ndarray, g: np.ndarray, raw_blocks, hessian: str):
    """(linear gains -c + M^_ii / 2, projected blocks) of the greedy, with c = g * sigma and, per Hessian block
    (indices, H), M^ = project_submodular(diag(sigma) H diag(sigma)); blocks only for ``hessian: projected``."""
    sigma, g = np.asarray(sigma, dtype=np.float64), np.asarray(g, dtype=np.float64)
    linear = -(g * sigma)
    blocks = []
    for idx, H in raw_blocks:
        s_block = sigma[idx]
        M = project_submodular(s_block[:, None] * H * s_block[None, :])
        linear[idx] += 0.5 * np.diag(M)
        if hessian == "projected":
            blocks.append((idx, M))
    return linear, blocks


def restrict_blocks(raw_blocks, keep: np.ndarray, n: int):
    """The Hessian blocks restricted to the items ``keep`` (indices into 0..n-1), re-indexed to 0..len(keep)-1."""
    remap = np.full(int(n), -1)
    remap[keep] = np.arange(len(keep))
    out = []
    for idx, H in raw_blocks:
        inside = remap[idx] >= 0
        out.append((remap[idx[inside]], H[np.ix_(inside, inside)]))
    return out


def site_derivatives(loss, names: list[str], sigmas: list[torch.Tensor], picks, structure: str):
    """(sigma, g = dL/dsigma, offsets, blocks) for sigma = the concatenated per-site vectors, ``loss`` a function of
    {site: vector}; ``picks[g]`` the local indices of site g with second-order terms, in one exact Hessian block
    (``full``), one block per site (``block``) or none (``none``). Float64 numpy."""
    import torch

    offsets = np.concatenate([[0], np.cumsum([len(sigma) for sigma in sigmas])]).astype(int)
    per_site = [[int(offsets[g] + i) for i in pick] for g, pick in enumerate(picks)]
    if structure == "full":
        rows = [[j for site_rows in per_site for j in site_rows]]
    elif structure == "block":
        rows = per_site
    else:  # "none": first order only
        rows = []

    def joint(x):
        return loss({name: x[offsets[g] : offsets[g + 1]] for g, name in enumerate(names)})

    x = torch.cat(sigmas) if sigmas else torch.zeros(0)
    g_all, hessians = gradient_and_hessian(joint, x, rows)
    blocks = [(np.asarray(r, dtype=int), H) for r, H in zip(rows, hessians) if r]
    return x.to(torch.float64).cpu().numpy(), g_all, offsets, blocks


class SubLoraSelector(Selector):
    name = "sublora"
    version = "2"
    description = (
        "SubLoRA: second-order loss model in the singular values (adapters' E or SVD), projected to be submodular,"
        " greedy until the gain is non-positive or the budget is met, keeping exactly the selected components;"
        " post-hoc or joint with fine-tuning (adaptation)."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION, ADAPTATION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO, RANK_TOTAL})

    class Params(PluginParams):
        hessian: Literal["projected", "diagonal", "none"] = Field(
            "projected", description="projected second order (submodular), Hessian diagonal only, or first order"
        )
        structure: Literal["auto", "full", "block"] = Field(
            "auto",
            description="exact Hessian over all sites' top_k (full) or per-site top_k blocks; auto: full if n <= "
            "full_max",
        )
        top_k: int = Field(16, ge=1, description="leading components per site with second-order terms")
        full_max: int = Field(256, ge=0, description="auto: exact full Hessian over all components when n <= this")
        greedy: Literal["best", "ratio"] = Field(
            "best", description="CELF best of ratio and unit-cost greedy, or ratio"
        )
        components: Literal["free", "prefix"] = Field(
            "free", description="compression: exactly the selected components (any), or prefixes only"
        )
        fill: bool = Field(
            False,
            description="keep adding components with non-positive gain until the budget is full (false: stop at the "
            "first non-positive gain, the maximisation of F)",
        )
        calib_batches: int | None = Field(
            None, ge=1,
            description="compression: calibration batches for g and H (None: all; fewer makes derivatives cheaper)",
        )
        mode: Literal["posthoc", "joint"] = Field(
            "posthoc",
            description="adaptation: one determination after training (posthoc) or determinations alternating with "
            "training (joint, budgets per ``schedule``)",
        )
        retrain_fraction: float | None = Field(
            None, ge=0.0, le=1.0,
            description="adaptation, posthoc: steps trained after the determination, round(this * total steps) "
            "(None: the task's retrain steps)",
        )
        tinit_fraction: float = Field(
            0.1, ge=0.0, le=1.0,
            description="adaptation, joint: warm-up before the first determination, round(this * total steps)",
        )
        tfinal_fraction: float = Field(
            0.3, ge=0.0, le=1.0,
            description="adaptation, joint: steps trained after the final determination, round(this * total steps)",
        )
        determinations: int = Field(
            10, ge=1, description="adaptation, joint: rank determinations evenly spaced over (tinit, T - tfinal]"
        )
        schedule: Literal["cubic", "constant"] = Field(
            "cubic",
            description="adaptation, joint: budget of each determination, AdaLoRA's cubic decrease to the target "
            "(cubic) or the target every time (constant)",
        )

        @model_validator(mode="after")
        def _phases_fit(self):
            if self.tinit_fraction + self.tfinal_fraction > 1.0:
                raise ValueError("tinit_fraction + tfinal_fraction must not exceed 1")
            return self

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

    def skip(self, task, factorization) -> str | None:
        if self.params.mode == "joint" and getattr(task, "problem_kind", None) == COMPRESSION:
            return "sublora mode joint alternates with fine-tuning: adaptation problems only"
        return kind_budget_skip(self, task) or needs_svd_form(self, factorization)

    # -- derivatives ---------------------------------------------------------------------------------------------
    def plan(self, problem: RankProblem, lengths: list[int]) -> tuple[str, int]:
        """(structure actually used, components per site with second-order terms)."""
        if self.params.hessian == "none":
            return "none", 0
        n = sum(lengths)
        if self.params.structure == "auto":
            return ("full", max(lengths)) if n <= self.params.full_max else ("block", self.params.top_k)
        return self.params.structure, self.params.top_k

    def derivatives(self, problem: RankProblem, structure: str, k: int):
        """(sigma per site, g per site, blocks) with blocks = [(global component indices, H block)]; memoised."""
        key = ("sublora-derivatives", structure, k, self.params.calib_batches)
        return memo(problem, key, lambda: self._derivatives(problem, structure, k))

    def _derivatives(self, problem: RankProblem, structure: str, k: int):
        import torch

        sigma_loss = problem.stats.sigma_loss

        def loss(sigmas):
            return sigma_loss(sigmas, self.params.calib_batches)

        names = [site.name for site in problem.sites]
        sigmas = [problem.stats.decomposition(name).s.detach() for name in names]
        picks = [range(min(k, len(sigma))) for sigma in sigmas]  # the leading components of each site
        _, g_all, offsets, blocks = site_derivatives(loss, names, sigmas, picks, structure)
        grads = [g_all[offsets[g] : offsets[g + 1]] for g in range(len(names))]
        sigma_np = [s.to(torch.float64).cpu().numpy() for s in sigmas]
        return sigma_np, grads, offsets, blocks

    # -- selection -----------------------------------------------------------------------------------------------
    def objective(self, problem: RankProblem):
        """(linear gains -c + M_ii/2 over all components, projected blocks, lengths) for the greedy."""
        lengths = [int(min(len(problem.stats.decomposition(s.name).s), s.max_rank)) for s in problem.sites]
        structure, k = self.plan(problem, lengths)
        sigma, grads, offsets, raw_blocks = self.derivatives(problem, structure, k)
        # Components beyond max_rank (if a decomposition is longer) are dropped from the allocation.
        keep = np.concatenate([offsets[g] + np.arange(n) for g, n in enumerate(lengths)])
        s_all, g_all = np.concatenate(sigma), np.concatenate(grads)
        blocks = restrict_blocks(raw_blocks, keep, int(offsets[-1]))
        linear, blocks = quadratic_model(s_all[keep], g_all[keep], blocks, self.params.hessian)
        return linear, blocks, lengths

    def select(self, problem: RankProblem) -> Ranks:
        limit = param_limit(problem, self.name)
        if sum(site_params(site, 1) for site in problem.sites) > limit:
            return ones(problem)
        linear, blocks, lengths = self.objective(problem)
        groups, pred, starts = component_layout(problem, lengths)
        costs = [lambda r, site=site: site_params(site, r) for site in problem.sites]
        prefix = pred if self.params.components == "prefix" else None
        runs = [True, False] if self.params.greedy == "best" else [True]
        best = None
        for ratio in runs:
            chosen, value = budgeted_greedy(
                linear,
                groups,
                costs,
                limit,
                blocks=blocks,
                pred=prefix,
                forced=[int(i) for i in starts],
                ratio=ratio,
                fill=self.params.fill,
            )
            if best is None or value > best[1]:
                best = (chosen, value)
        return selection_answer(problem, groups, best[0])

    # -- adaptation ----------------------------------------------------------------------------------------------
    def adaptation_derivatives(self, problem: RankProblem, trainer: AdapterTrainer):
        """(E of all adapters concatenated, g = dL/dE, offsets, blocks) of ``trainer.sigma_loss`` at the current E,
        blocks = [(indices, exact Hessian block)] as ``plan`` decides (float64 numpy; nothing memoised)."""
        import torch

        adapters = trainer.adapters
        names = list(adapters)
        sigmas = [adapters[name].E.detach() for name in names]
        structure, k = self.plan(problem, [len(sigma) for sigma in sigmas])
        # the k components of largest |E| (adapter components have no order; all of them when k >= the rank)
        picks = [
            sorted(np.argsort(-sigma.abs().to(torch.float64).cpu().numpy(), kind="stable")[:k]) for sigma in sigmas
        ]
        return site_derivatives(trainer.sigma_loss, names, sigmas, picks, structure)

    def determine(self, problem: RankProblem, trainer: AdapterTrainer, budget: int) -> np.ndarray:
        """Boolean keep-vector over all components (sites in order): the greedy's set of at most ``budget`` of the
        unmasked components under the second-order model at the current E (see the module docstring); records the
        determination point with the trainer (``mark_determination``)."""
        adapters = list(trainer.adapters.values())
        alive = np.concatenate([a.mask.detach().cpu().numpy() > 0 for a in adapters] or [np.zeros(0, bool)])
        n = len(alive)
        keep = np.zeros(n, dtype=bool)
        candidates = np.flatnonzero(alive)
        if int(budget) <= 0 or (self.params.fill and int(budget) >= len(candidates)):
            trainer.mark_determination()
            if int(budget) > 0:
                keep[candidates] = True
            return keep
        sigma, g, offsets, raw_blocks = self.adaptation_derivatives(problem, trainer)
        trainer.mark_determination(sigma_grad_norm=float(np.linalg.norm(g)))
        blocks = restrict_blocks(raw_blocks, candidates, n)
        linear, blocks = quadratic_model(sigma[candidates], g[candidates], blocks, self.params.hessian)
        groups = np.searchsorted(offsets, candidates, side="right") - 1  # site of every candidate
        costs = [lambda r: r] * len(adapters)  # unit cost: a cardinality budget
        chosen, _ = budgeted_greedy(
            linear, groups, costs, float(budget), blocks=blocks, ratio=False, fill=self.params.fill
        )
        keep[candidates[chosen]] = True
        return keep

    @staticmethod
    def apply(trainer: AdapterTrainer, keep: np.ndarray, final: bool) -> None:
        """Components outside ``keep``: masked off for good (``final``), else only E := 0 (they may revive)."""
        import torch

        start = 0
        for adapter in trainer.adapters.values():
            r = adapter.init_rank
            part = torch.from_numpy(keep[start : start + r])
            if final:
                mask_components(adapter, part & (adapter.mask.detach().cpu() > 0))
            else:
                with torch.no_grad():
                    adapter.E.masked_fill_(~part.to(adapter.E.device), 0.0)
            start += r

    def joint_steps(self, total_steps: int) -> tuple[int, int, list[int]]:
        """(tinit, tfinal, determination steps) of the joint mode; the last step is T - tfinal (clipped to [1, T])."""
        tinit, tfinal, t_end = schedule_steps(total_steps, self.params.tinit_fraction, self.params.tfinal_fraction)
        span, count = t_end - tinit, self.params.determinations
        if span <= 0:
            return tinit, tfinal, [t_end]
        steps = sorted({tinit + int(math.floor(j * span / count + 0.5)) for j in range(1, count + 1)} - {tinit})
        return tinit, tfinal, steps

    def adapt(self, problem: RankProblem, trainer: AdapterTrainer) -> dict[str, int]:
        """Fine-tune and determine ranks (``mode``: posthoc or joint; see the module docstring)."""
        target = rank_total_limit(problem, self.name)
        adapters = trainer.adapters
        if self.params.fill and target >= sum(a.rank for a in adapters.values()):
            return {name: a.rank for name, a in adapters.items()}  # the budget never binds: nothing to prune
        T = trainer.total_steps
        if self.params.mode == "posthoc":
            if self.params.retrain_fraction is None:
                retrain = trainer.retrain_steps
            else:
                retrain = int(math.floor(self.params.retrain_fraction * T + 0.5))
            trainer.train(max(0, T - retrain) - trainer.step_count)
            self.apply(trainer, self.determine(problem, trainer, target), final=True)
        else:
            init_budget = sum(a.init_rank for a in adapters.values())
            tinit, tfinal, steps = self.joint_steps(T)
            for j, step in enumerate(steps):
                trainer.train(step - trainer.step_count)
                final = j == len(steps) - 1
                if final or self.params.schedule == "constant":
                    budget = target
                else:
                    budget = budget_schedule(step, T, init_budget, target, tinit, tfinal)
                self.apply(trainer, self.determine(problem, trainer, budget), final=final)
        return {name: a.rank for name, a in adapters.items()}


@hookimpl
def rankbench_register_selectors(register):
    register(SubLoraSelector)
