"""``taylor-sensitivity``: first-order Taylor sensitivity of the singular components, greedy to a parameter budget
(``docs/algorithms.md#taylor-sensitivity``). The score is AdaLoRA's sensitivity I(p) = |p dL/dp| and its triplet
form (Zhang, Chen, Bukharin et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023)
evaluated once, on a calibration gradient, for post-training SVD compression; it is *not* AdaLoRA: there is no
smoothing over steps, no uncertainty term and no budget schedule (those need a sequence of training steps; the
``adalora`` selector implements them for LoRA fine-tuning). Compression problems only (budget kind ``param_ratio``).

Score. The site's decomposition W = L diag(s) R (``decomposition``: left L out x p, s, right R p x in; W = sum_i s_i
l_i r_i^T with l_i = L[:, i] and r_i = R[i, :]) plays AdaLoRA's P diag(E) Q, and G = dL/dW is the gradient of the
mean calibration loss at the dense model (``weight_grad``). By the chain rule (W is linear in s_i, in l_i and in
r_i):

    dL/ds_i     = l_i^T G r_i
    dL/dL[j,i]  = s_i (G r_i)_j              (j = 1..out)
    dL/dR[i,k]  = s_i (l_i^T G)_k            (k = 1..in)

    I_i^E  = | s_i dL/ds_i |
    S_i    = I_i^E + (1/out) sum_j | L[j,i] s_i (G r_i)_j | + (1/in) sum_k | R[i,k] s_i (l_i^T G)_k |   (``triplet``)

(``score: singular`` uses I_i^E alone.) Both sums of the *signed* entry sensitivities equal s_i dL/ds_i (Euler's
identity for a function linear in l_i, resp. r_i), so the vector terms are absolute-value spreads of the same
first-order quantity: S_i is a first-order Taylor estimate of the loss change when component i is removed. One
gradient is used (the mean over calibration batches; |s * mean grad|, not a mean of per-batch |.|). The scores
depend on how the decomposition splits scale between L, s and R (orthonormal L and R for ``svd``). Scores are
memoised per task configuration and factorization (``_allocation.memo``), so every budget reuses them.

Allocation (budget kind ``param_ratio``, rho). All (site, i) are ranked by S_i; every site first keeps its best
component (at least rank 1), then components are taken in decreasing score while the parameter total (kept
components of a site of shape m x n cost params_at_rank(count), i.e. m+n each) stays <= rho * sum dense; a
component that no longer fits is skipped and the scan goes on, so in the end no further component of any site fits
(the scores are non-negative, so spending the budget never lowers the first-order estimate). With ``components:
free`` (default) a site keeps exactly the components selected (``Components``: the compression protocol rebuilds it
from them, not from its leading ones); ``components: prefix`` only lets component i be selected after component
i-1 (a greedy over prefixes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field

from rankbench.api import COMPRESSION, PARAM_RATIO, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench_plugins.selectors._allocation import (
    budgeted_greedy,
    component_layout,
    memo,
    needs_svd_form,
    ones,
    param_limit,
    selection_answer,
    site_params,
)

if TYPE_CHECKING:
    import torch


def sensitivity_scores(weight_grad: torch.Tensor, left: torch.Tensor, s: torch.Tensor, right: torch.Tensor):
    """(I^E, mean_j |L_ji dL/dL_ji|, mean_k |R_ik dL/dR_ik|) per component, as float64 numpy arrays."""
    import torch

    G = weight_grad.to(torch.float64)
    L, s, R = left.to(G), s.to(G), right.to(G)
    GR = G @ R.T  # out x p: column i = G r_i
    LG = L.T @ G  # p x in:  row i = l_i^T G
    ds = (L * GR).sum(dim=0)
    e = (s * ds).abs()
    u = ((L * GR).abs() * s.abs()).mean(dim=0)
    v = ((R * LG).abs() * s.abs()[:, None]).mean(dim=1)
    return tuple(x.detach().cpu().numpy() for x in (e, u, v))


def allocate_scores(problem: RankProblem, scores: list[np.ndarray], limit: float, prefix: bool):
    """Keep components in decreasing score under the budget (at least one per site): the selected ``Components``."""
    groups, pred, starts = component_layout(problem, [len(s) for s in scores])
    flat = np.concatenate(scores)
    if prefix:
        forced = [int(i) for i in starts]
    else:
        forced = [int(start + np.argmax(s)) for start, s in zip(starts, scores)]
    costs = [lambda k, site=site: site_params(site, k) for site in problem.sites]
    chosen, _ = budgeted_greedy(
        flat, groups, costs, limit, pred=pred if prefix else None, forced=forced, ratio=False, fill=True
    )
    return selection_answer(problem, groups, chosen)


class TaylorSensitivitySelector(Selector):
    name = "taylor-sensitivity"
    version = "1"
    description = (
        "First-order Taylor sensitivity |s dL/ds| (+ singular-vector terms, AdaLoRA's triplet form) of one calibration"
        " gradient, greedy to a parameter budget, keeping exactly the selected components (compression)."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO})

    class Params(PluginParams):
        score: Literal["triplet", "singular"] = Field(
            "triplet", description="the triplet score S_i, or the singular-value term |s_i dL/ds_i| alone"
        )
        components: Literal["free", "prefix"] = Field(
            "free", description="exactly the selected components, or prefixes only"
        )

    def skip(self, task, factorization) -> str | None:
        return needs_svd_form(self, factorization)

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

    def scores(self, problem: RankProblem) -> list[np.ndarray]:
        """Score of every component of every site (memoised)."""
        return memo(problem, ("taylor-scores", self.params.score), lambda: self._scores(problem))

    def _scores(self, problem: RankProblem) -> list[np.ndarray]:
        out = []
        for site in problem.sites:
            dec = problem.stats.decomposition(site.name)
            grad = problem.stats.weight_grad(site.name)
            e, u, v = sensitivity_scores(grad, dec.left, dec.s, dec.right)
            score = e + u + v if self.params.score == "triplet" else e
            out.append(score[: int(site.max_rank)])
        return out

    def select(self, problem: RankProblem) -> Ranks:
        limit = param_limit(problem, self.name)
        if sum(site_params(site, 1) for site in problem.sites) > limit:
            return ones(problem)
        return allocate_scores(problem, self.scores(problem), limit, prefix=self.params.components == "prefix")


@hookimpl
def rankbench_register_selectors(register):
    register(TaylorSensitivitySelector)
