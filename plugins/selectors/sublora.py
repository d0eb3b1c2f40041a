"""``sublora``: second-order submodular rank allocation -- Gao & Tan, "Automatic Rank Determination for Low-Rank
Adaptation via Submodular Function Maximization" (2025, arXiv 2507.01841; not Lotfi et al.'s subspace LoRA);
ALGORITHMS.md §3.2, whose "implementable version" (a derivation, not the paper's text; the paper's Eq. 7-9 were
not available to check) this follows, applied to post-training compression.

Objective. sigma in R^n concatenates the singular values of all sites' decompositions (W_l = L_l diag(sigma_l) R_l,
the factorization's ``decomposition``), g = dL/dsigma and H = d^2L/dsigma^2 of the mean calibration loss at the dense
model (``sigma_loss``, by autograd). Pruning a set T of components moves sigma by -sigma * 1_T, and the second-order
Taylor expansion of the loss increase is, with c = g * sigma and M = diag(sigma) H diag(sigma),

    h(T) = -sum_{i in T} c_i + 1/2 sum_{i,j in T} M_ij .

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

Greedy (variant). Component i of a site of shape m x n costs m+n parameters (exactly: params_at_rank(count+1) -
params_at_rank(count)); budget rho * sum dense (``param_ratio``). Every site first keeps its leading component (at
least rank 1). ``greedy: ratio`` is the cost-benefit greedy: each step takes the affordable component with the
largest gain / cost. ``greedy: best`` (default) also runs the unit-cost greedy (largest gain) and keeps whichever
reaches the higher F -- the CELF rule of Leskovec et al. (KDD 2007), which guarantees >= (1 - 1/e)/2 of the optimum
for monotone submodular F under a knapsack constraint (the plain ratio greedy alone has no constant factor); under
a cardinality budget both are the classical (1 - 1/e) greedy. Both use lazy evaluation (exact, since with M^ >= 0
gains never increase). ``fill`` (default true) keeps adding components after the gains turn non-positive, until
nothing more fits: the benchmark compares methods at equal budgets, and the quadratic model is only local. The
protocol keeps the leading k components of a site, so with ``components: free`` a site's rank is the number of its
components selected, while ``components: prefix`` only lets component i in after component i-1.

Hessian restriction (deviation). n = sum_l min(m_l, n_l) is far too large for a dense Hessian on an LLM.
``structure: full`` computes the exact Hessian over the leading ``top_k`` components of every site, cross-site
terms included; ``structure: block`` computes exact per-site blocks over each site's leading ``top_k`` components
(top_k Hessian-vector products per site, each a double backward through one retained graph of the calibration
loss over all sites) and sets cross-site terms to zero. Components beyond top_k are scored first order only (no M terms). ``structure: auto`` (default) takes the
exact full Hessian over all n components when n <= ``full_max`` (small models, tests), else ``block``. g is exact
for every component. All derivatives are memoised per task configuration and factorization (``_allocation.memo``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from rankbench.api import COMPRESSION, PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._allocation import (
    budgeted_greedy,
    component_layout,
    memo,
    ones,
    param_limit,
    project_submodular,
    ranks_from_selection,
    site_params,
)


def gradient_and_hessian(loss_fn, x: torch.Tensor, blocks) -> tuple[np.ndarray, list[np.ndarray]]:
    """g = dL/dx (all entries, one backward) and, for every block (a list of indices of x), the Hessian block
    H[block][:, block]: one Hessian-vector product (a double backward through the same graph) per index."""
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


class SubLoraSelector(Selector):
    name = "sublora"
    version = "1"
    description = (
        "SubLoRA: second-order loss model in the singular values, projected to be submodular, greedy to budget."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO})

    class Params(PluginParams):
        hessian: Literal["projected", "diagonal", "none"] = Field(
            "projected", description="projected second order (submodular), Hessian diagonal only, or first order"
        )
        structure: Literal["auto", "full", "block"] = Field(
            "auto",
            description="exact Hessian over all sites' top_k (full) or per-site top_k blocks; auto: full if n<=full_max",
        )
        top_k: int = Field(16, ge=1, description="leading components per site with second-order terms")
        full_max: int = Field(256, ge=0, description="auto: exact full Hessian over all components when n <= this")
        greedy: Literal["best", "ratio"] = Field(
            "best", description="CELF best of ratio and unit-cost greedy, or ratio"
        )
        components: Literal["free", "prefix"] = Field("free", description="any components (rank = count) or prefixes")
        fill: bool = Field(True, description="keep adding components with non-positive gain until the budget is full")
        calib_batches: int | None = Field(
            None, ge=1, description="calibration batches for g and H (None: all; fewer makes derivatives cheaper)"
        )

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

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
        sigma_loss = problem.statistic("sigma_loss", problem.sites[0].name)

        def loss(sigmas):
            return sigma_loss(sigmas, self.params.calib_batches)

        names = [site.name for site in problem.sites]
        decs = [problem.statistic("decomposition", name) for name in names]
        sigmas = [dec.s.detach() for dec in decs]
        sizes = [len(s) for s in sigmas]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        per_site = [[int(offsets[g] + i) for i in range(min(k, sizes[g]))] for g in range(len(names))]
        if structure == "full":
            rows = [[j for site_rows in per_site for j in site_rows]]
        elif structure == "block":
            rows = per_site
        else:  # "none": first order only
            rows = []

        def joint(x):
            return loss({name: x[offsets[g] : offsets[g + 1]] for g, name in enumerate(names)})

        g_all, hessians = gradient_and_hessian(joint, torch.cat(sigmas), rows)
        grads = [g_all[offsets[g] : offsets[g + 1]] for g in range(len(names))]
        blocks = [(np.asarray(r, dtype=int), H) for r, H in zip(rows, hessians) if r]
        sigma_np = [s.to(torch.float64).cpu().numpy() for s in sigmas]
        return sigma_np, grads, offsets, blocks

    # -- selection -----------------------------------------------------------------------------------------------
    def objective(self, problem: RankProblem):
        """(linear gains -c + M_ii/2 over all components, projected blocks, lengths) for the greedy."""
        lengths = [int(min(len(problem.statistic("decomposition", s.name).s), s.max_rank)) for s in problem.sites]
        structure, k = self.plan(problem, lengths)
        sigma, grads, offsets, raw_blocks = self.derivatives(problem, structure, k)
        # Components beyond max_rank (if a decomposition is longer) are dropped from the allocation.
        keep = np.concatenate([offsets[g] + np.arange(n) for g, n in enumerate(lengths)])
        remap = np.full(int(offsets[-1]), -1)
        remap[keep] = np.arange(len(keep))
        s_all, g_all = np.concatenate(sigma), np.concatenate(grads)
        c = (g_all * s_all)[keep]
        linear = -c
        blocks = []
        for idx, H in raw_blocks:
            inside = remap[idx] >= 0
            idx, H = remap[idx[inside]], H[np.ix_(inside, inside)]
            s_block = s_all[keep][idx]
            M = project_submodular(s_block[:, None] * H * s_block[None, :])
            linear[idx] += 0.5 * np.diag(M)
            if self.params.hessian == "projected":
                blocks.append((idx, M))
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
        return ranks_from_selection(problem, groups, best[0])


@hookimpl
def rankbench_register_selectors(register):
    register(SubLoraSelector)
