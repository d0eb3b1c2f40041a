"""``sora``: SoRA -- Ding, Lv, Wang, Chen, Wang, Hu, Liu, Sun, Liu and Zhang, "Sparse Low-rank Adaptation of
Pre-trained Language Models", EMNLP 2023; ``docs/algorithms.md#sora``. Problem kind ``adaptation`` only: the rank of
every adapter is decided by a sparse gate trained with the adapters; no budget is read (the host runs it once,
budget null: the rank total is what the L1 proximal step leaves).

Model. SoRA's adapter is dW = B diag(g) A with a gate vector g in R^r; this repo's adapters are
scaling * P diag(E * mask) Q (``kinds.adaptation``), the same product with B = P, A = Q and g = scaling * E, so the
gate *is* E (up to the constant scaling, absorbed into the threshold below; the mask stays 1 until the end).

Training (paper Eq. 4-5; the authors' ``SparseAdamW``). Every adapter parameter other than the gate takes the
trainer's optimiser step (Adam) on the task loss; the gate takes a proximal step for the loss plus lambda ||g||_1:

    g_{t+1} = T_{eta_t lambda}( g_t - eta_t grad_g L ),      T_xi(z) = sign(z) max(|z| - xi, 0)   (soft threshold)

The authors' code (the configuration of the paper's main tables, ``run_glue_sora_no_schedule.sh``) replaces the
plain gradient step by an Adam step on the gate and thresholds with xi = ``sparse_lambda_2`` = 3e-4 per step (not
multiplied by the learning rate); here the gate's gradient step is the trainer's own Adam step and ``threshold`` is
xi (default 3e-4, the authors'). ``threshold_schedule`` offers the paper's sparsifying scheduler (Sec. 3.3: xi raised
step-wise from ``threshold`` to ``max_threshold`` in ``phases`` equal phases, linearly as the authors' ``linear``
schedule; default ``none``, the main tables' setting). A gate at exactly 0 may leave 0 again when one Adam step
exceeds xi (the paper prunes only after training). After the cell's Adam steps (all of them: the selector drives
training), the components whose gate is exactly 0 are removed (E := 0, mask := 0, ``mask_components``), so the rank
of a site is its number of nonzero gates; any L-BFGS steps the task asks for follow at those ranks.

Parameters: ``threshold`` xi = 3e-4 (authors' ``sparse_lambda_2``), ``threshold_schedule`` none | linear,
``max_threshold``, ``phases``.

Honest deviations. (1) The adapters' other factors (P, Q) keep the factorization's initialisation and the trainer's
Adam without weight decay, plus the trainer's orthogonality regulariser (``lora``'s ``orth_reg``) -- SoRA trains
A, B with AdamW (weight decay 0.1), A Kaiming-uniform, B = 0, g ~ N(0, 1). Here the gate starts where ``lora`` puts E
(0 for ``init: gaussian``, S_r / scaling for ``init: pissa``); the orthogonality regulariser (or weight decay in the
paper) is what keeps the L1 on g from being undone by growing P and Q. (2) Adam's epsilon is torch's 1e-8 (the
authors' transformers AdamW: 1e-6). (3) The gate is E, so the threshold acts on E = g / scaling: xi here is the
authors' xi divided by scaling (equal for scaling 1; the default lora alpha 8 with init rank 8 has scaling 1).

Rank-determination points: the final pruning is recorded (``mark_determination``) with ``gates_nonzero``, the total
number of nonzero gates; the trainer's ``rank_total`` curve shows the mask (constant until the pruning), the curve
``gates_nonzero_at_selection`` the gates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from rankbench.api import ADAPTATION, RANK_TOTAL, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench.kinds.adaptation import AdapterTrainer, mask_components

if TYPE_CHECKING:
    import torch


def soft_threshold(z: torch.Tensor, xi: float) -> torch.Tensor:
    """T_xi(z) = sign(z) max(|z| - xi, 0), elementwise (the proximal map of xi ||.||_1)."""
    import torch

    return torch.sign(z) * torch.clamp(z.abs() - float(xi), min=0.0)


def linear_thresholds(start: float, stop: float, phases: int) -> list[float]:
    """The authors' ``linear`` schedule: ``phases`` values evenly spaced from ``start`` to ``stop``."""
    if phases == 1:
        return [float(start)]
    return [start + (stop - start) * j / (phases - 1) for j in range(phases)]


class GateProximalStep:
    """The trainer's callback after every optimiser step: E := T_xi(E) on every adapter (the Adam step on E is the
    gradient step of the proximal update); ``xi`` follows the schedule over the cell's steps."""

    def __init__(self, thresholds: list[float], total_steps: int):
        self.thresholds, self.total_steps = thresholds, max(1, int(total_steps))

    def threshold(self, step: int) -> float:
        """xi at optimiser step ``step`` (1-based): phase floor((step - 1) * phases / T)."""
        phase = min(len(self.thresholds) - 1, (max(step, 1) - 1) * len(self.thresholds) // self.total_steps)
        return self.thresholds[phase]

    def __call__(self, trainer: AdapterTrainer) -> None:
        import torch

        xi = self.threshold(trainer.step_count)
        with torch.no_grad():
            for adapter in trainer.adapters.values():
                adapter.E.copy_(soft_threshold(adapter.E, xi))


def nonzero_gates(trainer: AdapterTrainer) -> int:
    return int(sum(int((a.effective_e() != 0).sum()) for a in trainer.adapters.values()))


class SoRASelector(Selector):
    name = "sora"
    version = "1"
    description = (
        "SoRA: gates E of the LoRA adapters trained by a proximal L1 step (Adam step, then soft threshold);"
        " rank = nonzero gates after fine-tuning (adaptation; no budget)."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({ADAPTATION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({RANK_TOTAL, None})

    class Params(PluginParams):
        threshold: float = Field(3e-4, ge=0.0, description="xi = eta lambda, the soft threshold per step (authors' "
                                 "sparse_lambda_2)")
        threshold_schedule: Literal["none", "linear"] = Field(
            "none", description="none: xi constant; linear: the sparsifying scheduler, xi from threshold to "
            "max_threshold in equal phases")
        max_threshold: float | None = Field(None, ge=0.0, description="linear schedule: the last phase's xi")
        phases: int = Field(5, ge=1, description="linear schedule: number of equal phases of the cell's steps")

        @model_validator(mode="after")
        def _schedule_complete(self):
            if self.threshold_schedule == "linear" and self.max_threshold is None:
                raise ValueError("threshold_schedule linear needs max_threshold")
            return self

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def thresholds(self) -> list[float]:
        p = self.params
        if p.threshold_schedule == "linear":
            return linear_thresholds(p.threshold, float(p.max_threshold), p.phases)
        return [p.threshold]

    def adapt(self, problem: RankProblem, trainer: AdapterTrainer) -> dict[str, int]:
        """Train every step with the proximal gate update, then prune the zero gates (see the module docstring)."""
        trainer.train(trainer.steps_left, after=GateProximalStep(self.thresholds(), trainer.total_steps))
        trainer.mark_determination(gates_nonzero=nonzero_gates(trainer))
        for adapter in trainer.adapters.values():
            mask_components(adapter, (adapter.E.detach() != 0) & (adapter.mask > 0))
        trainer.rank_curve.append((trainer.step_count, trainer.rank_total()))
        return {name: a.rank for name, a in trainer.adapters.items()}

    def select(self, problem: RankProblem) -> Ranks:
        raise TypeError("sora decides ranks while fine-tuning adapters (adapt); it has no post-hoc rule")


@hookimpl
def rankbench_register_selectors(register):
    register(SoRASelector)
