"""``adalora``: AdaLoRA -- Zhang, Chen, Bukharin et al., "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning" (AdaLoRA), ICLR 2023; ``docs/algorithms.md#adalora``. Two problem kinds: ``adaptation`` (the method itself:
ranks of LoRA adapters allocated during fine-tuning, budget kind ``rank_total``) and ``compression`` (its sensitivity
score used for post-training SVD compression, budget kind ``param_ratio``). Any other (kind, budget kind) pair is
skipped.

Adaptation (``adapt``; follows PEFT's ``RankAllocator``, huggingface/peft ``tuners/adalora/layer.py``). Every site
has an adapter scaling * P diag(E * mask) Q (``kinds.adaptation``); triplet i of a site is (P[:, i], E_i, Q[i, :]).
After every optimiser step t = 1, 2, ... (the trainer's callback, gradients still in ``.grad``), for every entry p
of every P, E and Q:

    I_t(p)    = | p dL/dp |                                         (sensitivity; L the training loss of step t)
    Ibar_t(p) = beta1 Ibar_{t-1}(p) + (1 - beta1) I_t(p)             (smoothed sensitivity; Ibar_0 = 0)
    Ubar_t(p) = beta2 Ubar_{t-1}(p) + (1 - beta2) | I_t(p) - Ibar_t(p) |     (uncertainty; Ubar_0 = 0)
    s_t(p)    = Ibar_t(p) Ubar_t(p)

    S_i = s(E_i) + (1/out) sum_j s(P_ji) + (1/in) sum_k s(Q_ik)           (``score: triplet``; ``singular``: s(E_i))

The budget follows AdaLoRA's cubic schedule (``budget_schedule``) over the cell's T steps, from
b_0 = sum of the sites' initial ranks down to the target b_T = floor(budget):

    b(t) = b_0                                                             t <= tinit      (warm-up, no masking)
    b(t) = int((b_0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3 + b_T)   tinit < t <= T - tfinal
    b(t) = b_T                                                             t >  T - tfinal (masks fixed)

In the middle phase, at every step with t % deltaT == 0, thr = the k-th smallest of all S_i over all sites with
k = b_0 - b(t), and E_i := 0 wherever S_i <= thr -- E only, not the mask, so a zeroed triplet gets gradients again
and may revive (PEFT). At t = T - tfinal (b(t) = b_T there) the final determination keeps exactly the b_T triplets
with the largest S (ties to the lower index, sites in order) and switches the others off for good (E := 0,
mask := 0, ``mask_components``), so the total rank is b_T <= budget; ``adapt`` then returns and the protocol trains
the remaining tfinal steps with the masks fixed (PEFT re-zeroes the masked E after every step instead: the same
model). When b_T >= b_0 nothing is ever masked.

Defaults: beta1 = beta2 = 0.85 (PEFT and the paper); tinit = 10 % and tfinal = 30 % of T (``tinit_fraction``,
``tfinal_fraction``, rounded to steps), deltaT = 10 steps (``delta_t``). PEFT's defaults (tinit = tfinal = 0,
deltaT = 1) leave no steps to train the final ranks; the paper's GLUE scripts use long warm-ups and final phases
and mask every 100 steps, so these defaults sit between. Differences from PEFT: steps are counted from 1 after
each optimiser step (PEFT's ``global_step`` from 0), the last score update is the one of the final determination's
own step (PEFT stops one step earlier), the final step T - tfinal is clipped to [1, T] (PEFT finalises at
global_step == total_step - tfinal, which a loop over global_step = 0..total_step-1 never reaches when tfinal = 0),
and the final mask keeps exactly b_T triplets (PEFT's ``<= thr`` may drop more on ties, as the intermediate masks
here still do). The orthogonality regulariser R(P, Q) is added by the trainer for every selector (factorization
``lora``'s ``orth_reg``), not here.

Compression (``select``). AdaLoRA keeps each adapter in SVD form P diag(E) Q and scores a parameter p by its
sensitivity I(p) = |p dL/dp|; the score of triplet i is S_i = s(E_i) + mean_j s(P_ji) + mean_k s(Q_ik).
Post-training analogue used here: the site's decomposition
W = L diag(s) R (``decomposition``: left L out x p, s, right R p x in; W = sum_i s_i l_i r_i^T with l_i = L[:, i]
and r_i = R[i, :]) plays P diag(E) Q, and G = dL/dW is the gradient of the mean calibration loss
at the dense model (``weight_grad``). By the chain rule (W is linear in s_i, in l_i and in r_i):

    dL/ds_i     = l_i^T G r_i
    dL/dL[j,i]  = s_i (G r_i)_j              (j = 1..out)
    dL/dR[i,k]  = s_i (l_i^T G)_k            (k = 1..in)

    I_i^E  = | s_i dL/ds_i |
    S_i    = I_i^E + (1/out) sum_j | L[j,i] s_i (G r_i)_j | + (1/in) sum_k | R[i,k] s_i (l_i^T G)_k |   (``triplet``)

(``score: singular`` uses I_i^E alone.) Both sums of the *signed* entry sensitivities equal s_i dL/ds_i (Euler's
identity for a function linear in l_i, resp. r_i), so the vector terms are absolute-value spreads of the same
first-order quantity. AdaLoRA's element score Ibar * Ubar (EMA of I over training steps times the EMA of |I - Ibar|)
needs a sequence of estimates; here there is one, so no EMA and no uncertainty factor: s(p) = I(p), the sensitivity
of one calibration gradient (the mean over calibration batches; |s * mean grad|, not a mean of per-batch |.|).
(With one estimate the uncertainty |I - Ibar| is 0 if Ibar is that estimate; PEFT's zero-initialised EMAs after a
single step would instead give s(p) proportional to I(p)^2.) The scores depend on how the decomposition splits
scale between L, s and R (orthonormal L and R for ``svd``). Scores are memoised per task configuration and
factorization (``_allocation.memo``), so every budget reuses them.

Allocation (budget kind ``param_ratio``, rho). All (site, i) are ranked by S_i; every site first keeps its best
component (at least rank 1), then components are taken in decreasing score while the parameter total (kept
components of a site of shape m x n cost params_at_rank(count), i.e. m+n each) stays <= rho * sum dense; a
component that no longer fits is skipped and the scan goes on, so in the end no further component of any site fits.
AdaLoRA masks arbitrary triplets, but the compression protocol keeps the leading k components of each site: with
``components: free`` (default) a site's rank is the number of its components selected; ``components: prefix`` only
lets component i be selected after component i-1 (a greedy over prefixes), so the scored set is the kept set.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
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
from rankbench.kinds.adaptation import AdapterTrainer, SVDAdapter, mask_components
from rankbench_plugins.selectors._allocation import (
    budget_schedule,
    budgeted_greedy,
    component_layout,
    kind_budget_skip,
    needs_svd_form,
    memo,
    ones,
    param_limit,
    rank_total_limit,
    ranks_from_selection,
    schedule_steps,
    site_params,
)


def sensitivity_scores(weight_grad: torch.Tensor, left: torch.Tensor, s: torch.Tensor, right: torch.Tensor):
    """(I^E, mean_j |L_ji dL/dL_ji|, mean_k |R_ik dL/dR_ik|) per component, as float64 numpy arrays."""
    G = weight_grad.to(torch.float64)
    L, s, R = left.to(G), s.to(G), right.to(G)
    GR = G @ R.T  # out x p: column i = G r_i
    LG = L.T @ G  # p x in:  row i = l_i^T G
    ds = (L * GR).sum(dim=0)
    e = (s * ds).abs()
    u = ((L * GR).abs() * s.abs()).mean(dim=0)
    v = ((R * LG).abs() * s.abs()[:, None]).mean(dim=1)
    return tuple(x.detach().cpu().numpy() for x in (e, u, v))


class SensitivityEMA:
    """AdaLoRA's smoothed sensitivity and uncertainty of every entry of every adapter's P, E and Q (PEFT's
    ``RankAllocator.update_ipt``): ``update`` after an optimiser step, while ``.grad`` holds that step's gradient."""

    PARTS = ("P", "E", "Q")

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.ibar: dict[tuple[str, str], torch.Tensor] = {}
        self.ubar: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def update(self, adapters: dict[str, SVDAdapter]) -> None:
        """I = |p * grad|; Ibar = b1 Ibar + (1 - b1) I; Ubar = b2 Ubar + (1 - b2) |I - Ibar| (EMAs start at 0)."""
        for name, adapter in adapters.items():
            for part in self.PARTS:
                p = getattr(adapter, part)
                key = (name, part)
                if key not in self.ibar:
                    self.ibar[key] = torch.zeros_like(p.detach())
                    self.ubar[key] = torch.zeros_like(p.detach())
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                sens = (p.detach() * grad).abs()
                self.ibar[key] = self.beta1 * self.ibar[key] + (1 - self.beta1) * sens
                self.ubar[key] = self.beta2 * self.ubar[key] + (1 - self.beta2) * (sens - self.ibar[key]).abs()

    def element_score(self, name: str, part: str, like: torch.Tensor) -> torch.Tensor:
        """s(p) = Ibar * Ubar for every entry of ``part`` of adapter ``name`` (zeros before the first update)."""
        key = (name, part)
        if key not in self.ibar:
            return torch.zeros_like(like.detach())
        return self.ibar[key] * self.ubar[key]

    def triplet_scores(self, adapters: dict[str, SVDAdapter], score: str = "triplet") -> dict[str, torch.Tensor]:
        """S_i = s(E_i) + mean_j s(P_ji) + mean_k s(Q_ik) per adapter (``singular``: s(E_i) alone)."""
        out = {}
        for name, adapter in adapters.items():
            total = self.element_score(name, "E", adapter.E).clone()
            if score == "triplet" and adapter.init_rank:
                total += self.element_score(name, "P", adapter.P).mean(dim=0)
                total += self.element_score(name, "Q", adapter.Q).mean(dim=1)
            out[name] = total
        return out


class RankAllocator:
    """One adaptation cell of AdaLoRA: the trainer's callback ``after`` every optimiser step updates the scores and
    masks to the budget schedule (see the module docstring). ``finalised`` once the final determination is made."""

    def __init__(self, adapters: dict[str, SVDAdapter], target: int, total_steps: int, tinit: int, tfinal: int,
                 t_end: int, delta_t: int, beta1: float, beta2: float, score: str = "triplet"):
        self.adapters = adapters
        self.init_budget = sum(a.init_rank for a in adapters.values())
        self.target = min(int(target), self.init_budget)
        self.total_steps, self.tinit, self.tfinal, self.t_end = int(total_steps), int(tinit), int(tfinal), int(t_end)
        self.delta_t = int(delta_t)
        self.score = score
        self.ema = SensitivityEMA(beta1, beta2)
        self.finalised = False
        self.masked_at: list[tuple[int, int]] = []  # (step, b(t)) of every intermediate masking, for inspection

    def budget(self, step: int) -> int:
        return budget_schedule(step, self.total_steps, self.init_budget, self.target, self.tinit, self.tfinal)

    def scores(self) -> torch.Tensor:
        """S of all triplets, sites in order, concatenated (float64, on the CPU)."""
        parts = self.ema.triplet_scores(self.adapters, self.score)
        flat = [parts[name].detach().to("cpu", torch.float64).reshape(-1) for name in self.adapters]
        return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)

    def __call__(self, trainer: AdapterTrainer) -> None:
        if self.finalised:
            return
        step = trainer.step_count
        if step <= self.t_end:
            self.ema.update(self.adapters)
        if step >= self.t_end:
            self.finalise()
            return
        if step > self.tinit and self.delta_t and step % self.delta_t == 0:
            budget = self.budget(step)
            self.mask_to_budget(budget)
            self.masked_at.append((step, budget))

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """PEFT's ``mask_to_budget``: thr = k-th smallest S with k = b_0 - budget; E_i := 0 where S_i <= thr."""
        k = self.init_budget - int(budget)
        scores = self.scores()
        if k <= 0 or not len(scores):
            return
        threshold = torch.kthvalue(scores, min(k, len(scores))).values
        start = 0
        for adapter in self.adapters.values():
            r = adapter.init_rank
            drop = (scores[start : start + r] <= threshold).to(adapter.E.device)
            adapter.E.masked_fill_(drop, 0.0)
            start += r

    def finalise(self) -> None:
        """Keep the ``target`` unmasked triplets with the largest S; mask the others off for good."""
        self.finalised = True
        scores = self.scores().numpy()
        alive = np.concatenate([a.mask.detach().cpu().numpy() > 0 for a in self.adapters.values()] or [[]])
        alive = alive.astype(bool)
        order = [int(i) for i in np.argsort(-scores, kind="stable") if alive[i]]
        keep = np.zeros(len(scores), dtype=bool)
        keep[order[: self.target]] = True
        start = 0
        for adapter in self.adapters.values():
            r = adapter.init_rank
            mask_components(adapter, torch.from_numpy(keep[start : start + r]))
            start += r


class AdaLoraSelector(Selector):
    name = "adalora"
    version = "1"
    description = (
        "AdaLoRA: EMA sensitivity scores and cubic budget schedule during fine-tuning (adaptation); its sensitivity"
        " |s dL/ds| (+ singular-vector terms) from the calibration gradient, greedy to budget (compression)."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION, ADAPTATION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO, RANK_TOTAL})

    class Params(PluginParams):
        score: Literal["triplet", "singular"] = Field(
            "triplet", description="both kinds: AdaLoRA's triplet score S_i, or the E / singular-value term alone"
        )
        components: Literal["free", "prefix"] = Field(
            "free", description="compression: any components (rank = count) or prefixes"
        )
        beta1: float = Field(0.85, gt=0.0, lt=1.0, description="adaptation: EMA factor of the sensitivity (Ibar)")
        beta2: float = Field(0.85, gt=0.0, lt=1.0, description="adaptation: EMA factor of the uncertainty (Ubar)")
        tinit_fraction: float = Field(
            0.1, ge=0.0, le=1.0, description="adaptation: warm-up without masking, tinit = round(this * total steps)"
        )
        tfinal_fraction: float = Field(
            0.3, ge=0.0, le=1.0,
            description="adaptation: final phase with the masks fixed, tfinal = round(this * total steps)",
        )
        delta_t: int = Field(10, ge=1, description="adaptation: mask to the schedule's budget every delta_t steps")

        @model_validator(mode="after")
        def _phases_fit(self):
            if self.tinit_fraction + self.tfinal_fraction > 1.0:
                raise ValueError("tinit_fraction + tfinal_fraction must not exceed 1")
            return self

    def skip(self, task, factorization) -> str | None:
        return kind_budget_skip(self, task) or needs_svd_form(self, factorization)

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

    def scores(self, problem: RankProblem) -> list[np.ndarray]:
        """Score of every component of every site (memoised)."""
        return memo(problem, ("adalora-scores", self.params.score), lambda: self._scores(problem))

    def _scores(self, problem: RankProblem) -> list[np.ndarray]:
        out = []
        for site in problem.sites:
            dec = problem.stats.decomposition(site.name)
            grad = problem.stats.weight_grad(site.name)
            e, u, v = sensitivity_scores(grad, dec.left, dec.s, dec.right)
            score = e + u + v if self.params.score == "triplet" else e
            out.append(score[: int(site.max_rank)])
        return out

    def adapt(self, problem: RankProblem, trainer: AdapterTrainer) -> dict[str, int]:
        """Fine-tune with AdaLoRA's allocation up to the final determination (step T - tfinal); see the docstring."""
        target = rank_total_limit(problem, self.name)
        adapters = trainer.adapters
        if target >= sum(a.rank for a in adapters.values()):
            return {name: a.rank for name, a in adapters.items()}  # the budget never binds: nothing to mask
        tinit, tfinal, t_end = schedule_steps(
            trainer.total_steps, self.params.tinit_fraction, self.params.tfinal_fraction
        )
        allocator = RankAllocator(
            adapters, target, trainer.total_steps, tinit, tfinal, t_end, self.params.delta_t,
            self.params.beta1, self.params.beta2, self.params.score,
        )
        trainer.train(t_end - trainer.step_count, after=allocator)
        if not allocator.finalised:  # no step was left to train (T = 0): decide on the scores there are
            allocator.finalise()
        return {name: a.rank for name, a in adapters.items()}

    def select(self, problem: RankProblem) -> Ranks:
        limit = param_limit(problem, self.name)
        if sum(site_params(site, 1) for site in problem.sites) > limit:
            return ones(problem)
        scores = self.scores(problem)
        return allocate_scores(problem, scores, limit, prefix=self.params.components == "prefix")


def allocate_scores(problem: RankProblem, scores: list[np.ndarray], limit: float, prefix: bool) -> dict[str, int]:
    """Keep components in decreasing score under the budget (at least one per site); ranks = counts per site."""
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
    return ranks_from_selection(problem, groups, chosen)


@hookimpl
def rankbench_register_selectors(register):
    register(AdaLoraSelector)
