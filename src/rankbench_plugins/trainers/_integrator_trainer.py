"""The light half of the rank-adaptive integrator shared by ``dlrt`` and ``tdlrt``: its knobs (``IntegratorParams``)
and the trainer base (``IntegratorTrainer``) the plugin modules subclass when they are imported. The integrator itself
(the minibatch loop, the truncation rule, the step rules and the layer base; the method: ``_integrator``'s docstring)
is in ``_integrator``, which imports torch and is imported only when a run trains."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rankbench.api import PluginParams
from rankbench.kinds.training import RankAdaptiveTrainer

if TYPE_CHECKING:
    import torch

    from rankbench.kinds.training import TrainingRun
    from rankbench_plugins.trainers._integrator import IntegratorLayer


class IntegratorParams(PluginParams):
    tau: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="relative truncation tolerance: keep the smallest rank whose discarded singular tail has norm "
                    "< tau * (norm of all singular values of the augmented core); 0 = never truncate. Default 0.1 = "
                    "the DLRT reference optimiser's default (its 'theta'); its LeNet5 runs used 0.09/0.15/0.3/0.45",
    )
    lr: float = Field(
        0.05, gt=0.0,
        description="SGD step of the integrator on the K/L factors, the augmented core and the layer bias "
                    "(the DLRT reference's LeNet5 run: 0.05)",
    )
    init_rank: int | None = Field(
        None, ge=1,
        description="starting rank (per mode for Tucker), clipped to the rank cap; None = the cap, as the DLRT "
                    "reference's adaptive layers start at their rmax",
    )
    rank_min: int = Field(2, ge=1, description="smallest rank truncation may give (the DLRT reference: 2)")
    rank_max: int | None = Field(
        None, ge=1,
        description="rank cap (per mode for Tucker); None = half the smaller dimension (per mode: half the mode "
                    "size), the DLRT reference's rmax for adaptive layers",
    )
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd",
        description="the integrator's step rule: 'sgd' (the papers' and reference runs' setting) or 'adam' (the "
                    "reference's KLS_optim=torch.optim.Adam: moments carried index-wise across basis changes; "
                    "see the module docstring). With 'adam' give an Adam-sized lr (e.g. 1e-3)",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam: torch.optim.Adam's betas")
    eps: float = Field(1e-8, gt=0.0, description="adam: torch.optim.Adam's eps")
    init: Literal["dense", "random"] = Field(
        "dense",
        description="'dense': the truncated SVD (Tucker: HOSVD) of the site's initial dense weight, so the run starts "
                    "from the dense reference's initialisation; 'random': the reference codes' random start",
    )


class IntegratorTrainer(RankAdaptiveTrainer):
    """Replaces every site by ``make_layer(...)`` and runs ``integrator_step`` over the task's epochs."""

    Params = IntegratorParams

    @abstractmethod
    def make_layer(self, linear: torch.nn.Linear, factorization, generator: torch.Generator) -> IntegratorLayer:
        """The layer that replaces one site, in the cell's format (``factorization``)."""

    def train(self, run: TrainingRun) -> None:
        import torch

        from rankbench_plugins.trainers._integrator import IndexwiseAdam, integrator_step

        generator = torch.Generator(device="cpu").manual_seed(int(getattr(run.ctx, "seed", 0)))
        layers = []
        for name, linear in run.sites.items():
            layer = self.make_layer(linear, run.factorization, generator)
            if self.params.optimizer == "adam":
                layer.adam = IndexwiseAdam(self.params.betas, self.params.eps)
            run.replace(name, layer)
            layers.append(layer)
        outside = [p for p in run.parameters_outside_layers() if p.requires_grad]
        optimizer = run.optimizer(outside) if outside else None
        p = self.params
        for epoch, batches in run.epochs():
            losses = [
                integrator_step(run.model, layers, lambda batch=batch: run.loss(batch), p.lr, p.tau, optimizer)
                for batch in batches
            ]
            run.end_epoch(epoch, sum(losses) / max(len(losses), 1))
