"""``adalora``: AdaLoRA -- Zhang, Chen, Bukharin et al., "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning" (AdaLoRA), ICLR 2023; ``docs/algorithms.md#adalora``. Problem kind ``adaptation`` only (ranks of LoRA
adapters allocated during fine-tuning, budget kind ``rank_total``): the method's smoothed sensitivity and uncertainty
need a sequence of training steps. Its one-gradient sensitivity score for post-training SVD compression, which this
selector used to offer, is the separate selector ``taylor-sensitivity`` (first order, no smoothing, no uncertainty).

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

Checked against PEFT (``tests/test_adaptation_selectors.py``, with PEFT's ``AdaLoraModel`` and ``RankAllocator``
on the same tiny network, the same initial P, E, Q and the same gradients): the EMA'd sensitivity and uncertainty
of every entry, the triplet scores, the thresholds and the intermediate masks agree to round-off step by step, and
the final kept set equals PEFT's ``mask_to_budget`` at b_T after the same last score update. PEFT's own
``update_and_allocate`` skips that last update at step T - tfinal (see the differences above), so the final sets
agree whenever that one update does not reorder the scores around the threshold.

Rank-determination points (``AdapterTrainer.mark_determination``): every intermediate masking step and the final
determination are recorded with the last step's loss and adapter gradient norms (curves ``*_at_selection``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from rankbench.api import ADAPTATION, RANK_TOTAL, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench.kinds.adaptation import AdapterTrainer, mask_components
from rankbench_plugins.selectors._allocation import (
    budget_schedule,
    kind_budget_skip,
    rank_total_limit,
    schedule_steps,
)

if TYPE_CHECKING:
    import torch

    from rankbench.kinds.layers import SVDAdapter


class SensitivityEMA:
    """AdaLoRA's smoothed sensitivity and uncertainty of every entry of every adapter's P, E and Q (PEFT's
    ``RankAllocator.update_ipt``): ``update`` after an optimiser step, while ``.grad`` holds that step's gradient."""

    PARTS = ("P", "E", "Q")

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.ibar: dict[tuple[str, str], torch.Tensor] = {}
        self.ubar: dict[tuple[str, str], torch.Tensor] = {}

    def update(self, adapters: dict[str, SVDAdapter]) -> None:
        """I = |p * grad|; Ibar = b1 Ibar + (1 - b1) I; Ubar = b2 Ubar + (1 - b2) |I - Ibar| (EMAs start at 0)."""
        import torch

        with torch.no_grad():
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
        import torch

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
        import torch

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
            trainer.mark_determination()
            self.finalise()
            return
        if step > self.tinit and self.delta_t and step % self.delta_t == 0:
            budget = self.budget(step)
            self.mask_to_budget(budget)
            self.masked_at.append((step, budget))
            trainer.mark_determination()

    def mask_to_budget(self, budget: int) -> None:
        """PEFT's ``mask_to_budget``: thr = k-th smallest S with k = b_0 - budget; E_i := 0 where S_i <= thr."""
        import torch

        with torch.no_grad():
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
        import torch

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
    version = "2"
    description = (
        "AdaLoRA: EMA sensitivity x uncertainty scores and cubic budget schedule while fine-tuning LoRA adapters"
        " (adaptation; the one-gradient compression score is taylor-sensitivity)."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({ADAPTATION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({RANK_TOTAL})

    class Params(PluginParams):
        score: Literal["triplet", "singular"] = Field(
            "triplet", description="AdaLoRA's triplet score S_i, or the E term s(E_i) alone"
        )
        beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the sensitivity (Ibar)")
        beta2: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the uncertainty (Ubar)")
        tinit_fraction: float = Field(
            0.1, ge=0.0, le=1.0, description="warm-up without masking, tinit = round(this * total steps)"
        )
        tfinal_fraction: float = Field(
            0.3, ge=0.0, le=1.0,
            description="final phase with the masks fixed, tfinal = round(this * total steps)",
        )
        delta_t: int = Field(10, ge=1, description="mask to the schedule's budget every delta_t steps")

        @model_validator(mode="after")
        def _phases_fit(self):
            if self.tinit_fraction + self.tfinal_fraction > 1.0:
                raise ValueError("tinit_fraction + tfinal_fraction must not exceed 1")
            return self

    def skip(self, task, factorization) -> str | None:
        return kind_budget_skip(self, task)

    def uses_budget(self, budget_kind: str | None) -> bool:
        return True

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
            trainer.mark_determination()
            allocator.finalise()
        return {name: a.rank for name, a in adapters.items()}

    def select(self, problem: RankProblem) -> Ranks:
        raise TypeError("adalora allocates ranks while fine-tuning (adapt); for compression use taylor-sensitivity")


@hookimpl
def rankbench_register_selectors(register):
    register(AdaLoraSelector)
