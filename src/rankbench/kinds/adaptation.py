"""The ``adaptation`` problem kind: ranks of LoRA adapters decided while, or after, a pretrained model is fine-tuned.

Adapters. Every site Linear (weight W0, out x in, frozen) gets an adapter in AdaLoRA's SVD form (Zhang et al.,
"Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023, Eq. 1; PEFT's ``SVDLinear``):

    y = W0 x + b + scaling * P diag(E * mask) Q x,      P: out x r,  E: r,  Q: r x in,  scaling = alpha / r,

r = ``init_rank`` capped at min(out, in), P and Q drawn from N(0, init_std^2), E = 0 (so the adapted model starts as
the pretrained one), ``mask`` in {0, 1}^r the components a selector keeps. A site at rank k stores k (out + in + 1)
parameters (a column of P, a row of Q, one E). The factorization plugin ``lora`` builds the adapters
(``AdapterFactorization``); AdaLoRA's orthogonality regulariser

    R(P, Q) = mean over adapters of ( ||P^T P - I||_F + ||Q Q^T - I||_F )             (PEFT's ``orth_reg_weight``)

is added to the task's training loss with weight ``orth_reg`` for every selector, so E plays the singular values.

Protocol. A task of this kind (``AdaptationTask``) supplies a pretrained model, its site Linears, a training loss on
the target problem and its metrics; ``run_adaptation`` does the rest. A selector either

* drives training itself: it defines ``adapt(problem, trainer) -> ranks`` (AdaLoRA's schedule, SubLoRA's joint
  mode) and is handed an ``AdapterTrainer`` for exactly ``steps`` optimiser steps; or
* is a post-hoc selector (any ``select``): the adapters train for ``steps - retrain_steps`` steps at their initial
  rank, each site's learned update dW = scaling P diag(E * mask) Q is handed over as ``Site.data`` with its singular
  values as ``Site.singular_values``, the chosen ranks truncate every adapter to the leading singular triplets of
  its dW (re-parameterised: P = U_k, E = s_k / scaling, Q = V_k^T, exact), and training continues for the
  remaining ``retrain_steps``.

A task may ask for ``lbfgs_steps`` L-BFGS iterations after the Adam steps (PINNacle's Adam-then-L-BFGS): they run
at the final ranks, for every selector and for the reference alike. Every selector therefore gets the same number
of optimiser steps on the same loss. Budget kind ``rank_total``: the
total rank summed over sites must not exceed the budget. The dense reference cell fine-tunes every weight of the
model (no adapters) for the same steps. Per cell the kind records ``params`` (the adapters' parameters at the final
ranks; the sites' dense parameters for the reference), ``rank_total``, ``param_ratio`` (params over the sites' dense
parameters) and the curves ``train_loss`` and ``rank_total``.

Rank-determination points. How well the adapters are optimised when ranks are decided is measured at every
determination (SubLoRA's premise is that they are, AdaLoRA decides while they are not): ``AdapterTrainer.step``
keeps, for its optimiser step, the training loss (no regulariser) and the gradient norms of the objective it
differentiated, over every adapter parameter (P, E, Q of all adapters) and over the E alone (the regulariser does
not depend on E, so that one is the training loss's); ``mark_determination()`` appends those of the last step
(the gradient at the parameters that step started from: no extra loss evaluation, so no minibatch or random draw
is consumed and training is unchanged) with any numbers the selector adds. The protocol marks the post-hoc
selection point itself; a selector that drives training marks its own (``adalora``: every masking step and the
final one; ``sublora``: every determination, adding ``sigma_grad_norm`` = ||dL/dE|| of its own derivatives at the
determination). The cell records the curves ``loss_at_selection``, ``grad_norm_at_selection``,
``grad_norm_E_at_selection`` (and the selector's extras, ``<name>_at_selection``) over the determination steps,
and the values at the last determination as metrics of the same names.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from collections.abc import Callable
from typing import ClassVar, TYPE_CHECKING

import numpy as np
from pydantic import Field

from rankbench.api import (
    ADAPTATION,
    RANK_TOTAL,
    Diverged,
    Factorization,
    PluginParams,
    RankProblem,
    Ranks,
    Site,
    Task,
    lazy_attributes,
)
from rankbench.kinds.compression import CompressionTask
from rankbench.kinds.protocol import Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rankbench.kinds.layers import SVDAdapter


class AdapterFactorization(Factorization):
    """Base of adapter factorizations (``lora``): how adapters are built, initialised and regularised."""

    problem_kinds: ClassVar[frozenset[str]] = frozenset({ADAPTATION})

    class Params(PluginParams):
        init_rank: int = Field(8, ge=1, description="components per site at the start (capped at min(out, in))")
        alpha: float = Field(8.0, gt=0.0, description="scaling = alpha / init_rank (PEFT's lora_alpha)")
        init_std: float = Field(0.02, gt=0.0, description="std of the normal initialisation of P and Q")
        orth_reg: float = Field(0.1, ge=0.0, description="weight of AdaLoRA's orthogonality regulariser")

    def attach(self, model: nn.Module, site_names: list[str], seed: int) -> dict[str, SVDAdapter]:
        from rankbench.kinds.layers import SVDAdapter
        from torch import nn
        import torch
        generator = torch.Generator().manual_seed(int(seed))
        adapters = {}
        for name in site_names:
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"site {name!r} is a {type(base).__name__}, not a Linear")
            adapter = SVDAdapter(base, self.params.init_rank, self.params.alpha, self.params.init_std, generator)
            model.set_submodule(name, adapter)
            adapters[name] = adapter
        return adapters


@dataclasses.dataclass(frozen=True)
class AdaptationSettings:
    """How a task fine-tunes: ``steps`` optimiser steps per cell, of which the last ``retrain_steps`` follow a post-hoc
    selection; Adam's learning rate for the adapters (``lr``) and for full fine-tuning in the reference cell;
    ``lbfgs_steps`` L-BFGS iterations after the last Adam step, at the final ranks (0: Adam only)."""

    steps: int
    retrain_steps: int
    lr: float
    reference_lr: float
    lbfgs_steps: int = 0


class AdapterTrainer:
    """Fine-tunes the adapters of one cell with Adam on ``task.training_loss`` + ``orth_reg`` * regulariser.

    ``step(after)`` runs backward, the optimiser step, then ``after(trainer)`` while the gradients are still in
    ``.grad`` (where PEFT calls ``update_and_allocate``), then clears them. ``steps_left`` counts down from the
    cell's total, so a selector that drives training (``adapt``) cannot use more steps than any other selector.
    """

    def __init__(self, task: AdaptationTask, ctx, model: nn.Module, adapters: dict[str, SVDAdapter],
                 settings: AdaptationSettings, orth_reg: float):
        self.task, self.ctx, self.model, self.adapters = task, ctx, model, adapters
        self.lr, self.orth_reg = float(settings.lr), float(orth_reg)
        self.total_steps = int(settings.steps)
        self.retrain_steps = int(settings.retrain_steps)  # what post-hoc selection leaves for training afterwards
        self.step_count = 0
        self.loss_curve: list[tuple[int, float]] = []
        self.rank_curve: list[tuple[int, int]] = [(0, self.rank_total())]
        # the last optimiser step's loss and gradient norms, and those at every rank determination (module docstring)
        self.last_step: dict[str, float] | None = None
        self.determinations: list[dict[str, float]] = []
        # modules the task trains fully beside the adapters (PEFT's ``modules_to_save``, e.g. a new head)
        self.extra_params = [p for p in task.trained_beside_adapters(model)]
        for p in self.extra_params:
            p.requires_grad_(True)
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        import torch
        params = [p for a in self.adapters.values() for p in (a.P, a.E, a.Q) if p.numel()] + self.extra_params
        return torch.optim.Adam(params, lr=self.lr) if params else None

    @property
    def steps_left(self) -> int:
        return self.total_steps - self.step_count

    def rank_total(self) -> int:
        return sum(a.rank for a in self.adapters.values())

    def regulariser(self) -> torch.Tensor:
        import torch
        terms = [a.orthogonality() for a in self.adapters.values() if a.init_rank]
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def step(self, after: Callable[[AdapterTrainer], None] | None = None) -> float:
        import torch
        if self.steps_left <= 0:
            raise RuntimeError(f"the cell's {self.total_steps} fine-tuning steps are used up")
        loss = self.task.training_loss(self.ctx, self.model)
        if not torch.isfinite(loss):
            raise Diverged(f"non-finite training loss at fine-tuning step {self.step_count}")
        total = loss + self.orth_reg * self.regulariser() if self.orth_reg else loss
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.last_step = {"loss": float(loss.detach()), **self._gradient_norms()}
            self.optimizer.step()
        self.step_count += 1
        if after is not None:
            after(self)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        every = max(1, self.total_steps // 200)
        if self.step_count % every == 0 or self.step_count == self.total_steps:
            self.loss_curve.append((self.step_count, value))
            self.rank_curve.append((self.step_count, self.rank_total()))
        return value

    def train(self, steps: int, after: Callable[[AdapterTrainer], None] | None = None) -> None:
        for _ in range(min(int(steps), self.steps_left)):
            self.step(after)

    def refine_lbfgs(self, iterations: int) -> None:
        """L-BFGS on the adapters (and the parameters trained beside them) at their final ranks, on the same
        objective as the Adam steps; the loss it ends at is appended to the ``train_loss`` curve."""
        import torch
        params = [p for a in self.adapters.values() for p in (a.P, a.E, a.Q) if p.numel()] + self.extra_params
        if not iterations or not params:
            return

        def objective() -> torch.Tensor:
            loss = self.task.training_loss(self.ctx, self.model)
            return loss + self.orth_reg * self.regulariser() if self.orth_reg else loss

        lbfgs_minimise(params, objective, iterations)
        with torch.no_grad():
            self.loss_curve.append((self.step_count + iterations, float(self.task.training_loss(self.ctx, self.model))))

    def _gradient_norms(self) -> dict[str, float]:
        """||grad|| over every adapter parameter (P, E, Q) and over the E alone, from the ``.grad`` just computed."""
        import torch
        total = e_only = 0.0
        for adapter in self.adapters.values():
            for part in (adapter.P, adapter.E, adapter.Q):
                if part.grad is not None:
                    square = float(part.grad.detach().to(torch.float64).square().sum())
                    total += square
                    if part is adapter.E:
                        e_only += square
        return {"grad_norm": total**0.5, "grad_norm_E": e_only**0.5}

    def mark_determination(self, **extra: float) -> None:
        """Record a rank determination now: the last optimiser step's loss and gradient norms (nothing before the
        first step) and the selector's ``extra`` numbers, at the current step (see the module docstring)."""
        row: dict[str, float] = {"step": float(self.step_count)}
        if self.last_step is not None:
            row.update(self.last_step)
        row.update({name: float(value) for name, value in extra.items()})
        self.determinations.append(row)

    def sigma_loss(self, sigmas: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss (no regulariser) with each named adapter's E replaced by ``sigmas[name]`` (the mask still
        applies), differentiable in ``sigmas``; the adapters' own parameters are left untouched."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            for name, sigma in sigmas.items():
                self.adapters[name].sigma_override = sigma
            # Fused attention kernels have no double backward; the math kernel does (Hessian-vector products).
            with sdpa_kernel(SDPBackend.MATH):
                return self.task.training_loss(self.ctx, self.model)
        finally:
            for name in sigmas:
                self.adapters[name].sigma_override = None

    def truncate(self, ranks: Ranks) -> None:
        """Truncate every adapter to its rank (SVD of its update) and restart Adam's moments on the new factors."""
        for name, adapter in self.adapters.items():
            adapter.truncate(int(ranks[name]))
        self.optimizer = self._new_optimizer()
        self.rank_curve.append((self.step_count, self.rank_total()))


class AdaptationTask(Task):
    """What a task of the adaptation kind supplies; ``run_adaptation`` is the protocol."""

    problem_kind: ClassVar[str] = ADAPTATION
    budget_kind: ClassVar[str | None] = RANK_TOTAL

    def trained_beside_adapters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters fully trained together with the adapters (a classification head; PEFT's ``modules_to_save``).
        They are trained in every cell alike and recorded as ``extra_trained_params``, not charged to the rank
        budget. Default: none (everything but the adapters stays frozen)."""
        return []

    @abc.abstractmethod
    def pretrained_model(self, ctx) -> nn.Module:
        """The pretrained model (memoised; never modified: every cell fine-tunes a deep copy)."""

    @abc.abstractmethod
    def adaptation_sites(self, model: nn.Module) -> list[str]:
        """Qualified names of the Linears that get adapters."""

    @abc.abstractmethod
    def training_loss(self, ctx, model: nn.Module) -> torch.Tensor:
        """The fine-tuning objective on the target problem (a scalar, differentiable in the adapters)."""

    @abc.abstractmethod
    def evaluate_adapted(self, ctx, model: nn.Module) -> None:
        """Record the quality metrics of a fine-tuned model through ``ctx.metric``."""

    @abc.abstractmethod
    def adaptation_settings(self) -> AdaptationSettings:
        """Steps, post-hoc retraining steps and learning rates of every cell."""


class AdaptsCompressionModel(CompressionTask, AdaptationTask):
    """The adaptation capabilities of a task whose pretrained model is its compression model (``model``, memoised)
    and whose adapted sites are its compression sites, evaluated the same way. Its parameters carry ``steps``,
    ``retrain_steps``, ``adapter_lr`` (the adapters' Adam rate) and ``lr`` (full fine-tuning in the reference cell),
    and may carry ``finetune_lbfgs_steps`` (L-BFGS after the Adam steps; absent: none); it still supplies
    ``training_loss`` on the target problem."""

    def pretrained_model(self, ctx) -> nn.Module:
        return self.model(ctx)

    def adaptation_sites(self, model: nn.Module) -> list[str]:
        return list(self.target_sites(model))

    def evaluate_adapted(self, ctx, model: nn.Module) -> None:
        self.evaluate(ctx, model)

    def adaptation_settings(self) -> AdaptationSettings:
        p = self.params
        return AdaptationSettings(steps=p.steps, retrain_steps=p.retrain_steps, lr=p.adapter_lr, reference_lr=p.lr,
                                  lbfgs_steps=getattr(p, "finetune_lbfgs_steps", 0))


def lbfgs_minimise(params: list[nn.Parameter], objective: Callable[[], torch.Tensor], iterations: int) -> None:
    """Full-batch L-BFGS on ``objective`` over ``params`` for at most ``iterations`` iterations: strong-Wolfe line
    search, history 50, step 1 -- PINNacle's second training phase after Adam. A non-finite objective raises
    ``Diverged``."""
    import torch
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=int(iterations), max_eval=int(iterations) * 5 // 4,
                                  history_size=50, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective()
        if not torch.isfinite(loss):
            raise Diverged("non-finite loss during L-BFGS")
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.zero_grad(set_to_none=True)


def dense_sites_params(model: nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


def run_adaptation_reference(task: AdaptationTask, ctx) -> None:
    """Full fine-tuning of every weight for the same steps and L-BFGS iterations (the dense reference of an
    adaptation cell)."""
    import torch
    settings = task.adaptation_settings()
    steps = settings.steps
    model = copy.deepcopy(task.pretrained_model(ctx))
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.reference_lr)
    curve = []
    with ctx.phase("finetune"):
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = task.training_loss(ctx, model)
            loss.backward()
            optimizer.step()
            if step % max(1, steps // 200) == 0 or step == steps:
                curve.append((step, loss.item()))
        if settings.lbfgs_steps:
            lbfgs_minimise(list(model.parameters()), lambda: task.training_loss(ctx, model), settings.lbfgs_steps)
            with torch.no_grad():
                curve.append((steps + settings.lbfgs_steps, float(task.training_loss(ctx, model))))
    if curve:
        ctx.curve("train_loss", [v for _, v in curve], [s for s, _ in curve])
    with ctx.phase("evaluate"):
        task.evaluate_adapted(ctx, model)
    dense = dense_sites_params(model, task.adaptation_sites(model))
    ctx.record_size(dense, dense)


def run_adaptation(task: AdaptationTask, ctx, selector, factorization: AdapterFactorization) -> None:
    """One adaptation cell: attach adapters, let the selector drive or follow training, evaluate, record."""
    settings = task.adaptation_settings()
    model = copy.deepcopy(task.pretrained_model(ctx))
    names = task.adaptation_sites(model)
    adapters = factorization.attach(model, names, seed=ctx.seed)
    trainer = AdapterTrainer(task, ctx, model, adapters, settings, factorization.params.orth_reg)
    problem = RankProblem(
        sites=[adapter_site(name, a) for name, a in adapters.items()],
        budget=ctx.budget,
        budget_kind=ctx.budget_kind,
        seed=ctx.seed,
        stats=AdaptationStatistics(trainer),
        device=ctx.device,
    )
    with ctx.phase("finetune"):
        if hasattr(selector, "adapt"):
            ranks = _checked(selector.adapt(problem, trainer), adapters, selector.name)
            trainer.train(trainer.steps_left)
            if ranks != {name: a.rank for name, a in adapters.items()}:
                raise RuntimeError(f"{selector.name} answered ranks {ranks} but left the adapters masked otherwise")
        else:
            trainer.train(settings.steps - settings.retrain_steps)
            trainer.mark_determination()
            problem.sites = [adapter_site(name, a, with_update=True) for name, a in adapters.items()]
            with ctx.phase("select"):
                ranks = selector.select(problem)
            trainer.truncate(_checked(ranks, adapters, selector.name))
            trainer.train(trainer.steps_left)
        trainer.refine_lbfgs(settings.lbfgs_steps)
    with ctx.phase("evaluate"):
        task.evaluate_adapted(ctx, model)
    final = {name: a.rank for name, a in adapters.items()}
    if ctx.budget_kind == RANK_TOTAL and ctx.budget is not None and sum(final.values()) > ctx.budget:
        raise RuntimeError(f"{selector.name} kept {sum(final.values())} components, over the budget {ctx.budget:g}")
    kept = 0
    for name, adapter in adapters.items():
        params = adapter.params_at_rank(final[name])
        kept += params
        ctx.ranks(name, final[name], params)
    ctx.record_size(kept, dense_sites_params(model, [n + ".base" for n in names]))
    if trainer.extra_params:
        ctx.metric("extra_trained_params", sum(p.numel() for p in trainer.extra_params), "", None)
    ctx.metric("rank_total", sum(final.values()), "", None)
    if trainer.loss_curve:
        ctx.curve("train_loss", [v for _, v in trainer.loss_curve], [s for s, _ in trainer.loss_curve])
    ctx.curve("rank_total", [r for _, r in trainer.rank_curve], [s for s, _ in trainer.rank_curve])
    record_determinations(ctx, trainer.determinations)


def record_determinations(ctx, rows: list[dict[str, float]]) -> None:
    """Curves ``<name>_at_selection`` over the determination steps and, as metrics, their last values."""
    names = sorted({name for row in rows for name in row} - {"step"})
    for name in names:
        points = [(row["step"], row[name]) for row in rows if name in row]
        ctx.curve(f"{name}_at_selection", [v for _, v in points], [s for s, _ in points])
        ctx.metric(f"{name}_at_selection", points[-1][1], "", None)


def adapter_site(name: str, adapter: SVDAdapter, with_update: bool = False) -> Site:
    """The selector's view of one adapter; with ``with_update`` the learned update and its spectrum."""
    import torch
    shape = tuple(adapter.base.weight.shape)
    site = Site(
        name=name,
        shape=shape,
        params_at_rank=adapter.params_at_rank,
        dense_params=int(np.prod(shape)),
        max_rank=adapter.init_rank,
    )
    if with_update:
        with torch.no_grad():
            delta = adapter.delta_weight().to(torch.float64).cpu().numpy()
        site.data = delta
        site.singular_values = np.linalg.svd(delta, compute_uv=False)[: adapter.init_rank]
    return site


class AdaptationStatistics:
    """What adaptation selectors may ask for (``problem.stats``): ``adapter(site)`` (the site's ``SVDAdapter``) and
    ``sigma_loss({site: sigma})`` (``AdapterTrainer.sigma_loss``: the training loss, differentiable in the sigmas)."""

    def __init__(self, trainer: AdapterTrainer):
        self.trainer = trainer

    def adapter(self, site: str) -> SVDAdapter:
        return self.trainer.adapters[site]

    def sigma_loss(self, sigmas: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.trainer.sigma_loss(sigmas)


def _checked(ranks: Ranks, adapters: dict[str, SVDAdapter], who: str) -> dict[str, int]:
    missing = set(adapters) - set(ranks)
    if missing:
        raise ValueError(f"selector {who} gave no rank for sites {sorted(missing)}")
    out = {}
    for name, adapter in adapters.items():
        k = ranks[name]
        k = int(max(k) if isinstance(k, (tuple, list)) else k)
        if not 0 <= k <= adapter.init_rank:
            raise ValueError(f"selector {who} gave site {name!r} rank {k}, outside 0..{adapter.init_rank}")
        out[name] = k
    return out


def mask_components(adapter: SVDAdapter, keep: torch.Tensor) -> None:
    """Switch the components where ``keep`` is False off for good: E := 0 and mask := 0 (no gradient revives them)."""
    import torch
    with torch.no_grad():
        keep = keep.to(device=adapter.E.device, dtype=torch.bool)
        adapter.E.masked_fill_(~keep, 0.0)
        adapter.mask.copy_(keep.to(adapter.mask.dtype))


def adaptation_setup(task: AdaptationTask, ctx) -> None:
    """Load the pretrained model (timed as phase ``setup``)."""
    task.pretrained_model(ctx)


def adaptation_skip(task: AdaptationTask, selector, factorization: Factorization) -> str | None:
    if not isinstance(factorization, AdapterFactorization):
        return f"factorization {factorization.name} builds no adapters"
    return None


PROTOCOL = Protocol(
    ADAPTATION, AdaptationTask, run=run_adaptation, reference=run_adaptation_reference, skip=adaptation_skip,
    setup=adaptation_setup,
)


# these names live in layers (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(__name__, "rankbench.kinds.layers", {"SVDAdapter"})
