"""Task ``pinn``: a physics-informed neural network pretrained on one PDE parameter, then adapted or compressed.

The PDE families, their reference solutions and the error metrics are in ``_pde`` (Burgers with a Cole-Hopf
reference, convection, Helmholtz 2D, Poisson 2D). The network (``_networks.TanhMLP``) is PINNacle's (Hao et al.,
NeurIPS 2024): a tanh MLP of ``depth`` hidden layers of ``width`` units, Glorot-normal weights, zero biases, inputs
mapped affinely from the PDE's box to [-1, 1]^d; every Linear is a site (``layers.0`` ... ``layers.{depth}``).

Loss (the plain PINN loss, equal weights as PINNacle's vanilla PINN): on fixed collocation points drawn once per
task configuration and seed -- ``n_interior`` uniform interior points, ``n_boundary`` points on the Dirichlet /
initial faces, and for periodic families ``n_boundary`` matched pairs --

    L(u) = mean_i r(x_i)^2 + mean_j (u(b_j) - g(b_j))^2 + mean_k (u(p_k) - u(p'_k))^2        (r the PDE residual).

Pretraining: Adam (lr ``lr``) for ``pretrain_steps`` steps on the ``source`` parameter, from a seed derived from the
task seed, then ``lbfgs_steps`` full-batch L-BFGS iterations (PINNacle's Adam-then-L-BFGS; strong-Wolfe line
search, history 50); the weights are cached on disk per configuration and seed (``$RANKBENCH_CACHE/pinn/``).

Problem kinds (``problem``)
    ``adaptation`` (default; budget kind ``rank_total``): fine-tune on the ``target`` parameter for ``steps`` Adam
        steps with LoRA adapters on every site (``rankbench.kinds.adaptation``); post-hoc selectors see the
        learned updates after ``steps - retrain_steps`` steps, and training continues ``retrain_steps`` steps at the
        chosen ranks. Adam with ``adapter_lr`` (LoRA is usually trained with a larger rate than full fine-tuning:
        at 1e-3 the adapters barely move from E = 0 in a few hundred steps). The dense reference fine-tunes all
        weights for ``steps`` steps with ``lr``. ``finetune_lbfgs_steps`` L-BFGS iterations follow the Adam steps at
        the final ranks, in every cell and in the reference alike. Metrics on the target PDE.
    ``compression`` (budget kind ``param_ratio``): post-training compression of the pretrained network's own
        weights (``rankbench.kinds.compression``), calibration loss = the PINN loss on the source problem;
        metrics on the source PDE.
    ``training`` (``rankbench.kinds.training``): the network trained from its initialisation on the source
        problem for ``pretrain_steps`` full-batch Adam steps (``lr``; epochs of ``epoch_steps`` steps), by a
        rank-adaptive method in its layer format or densely (the reference, whose weights the compression selectors
        of the same task compress). Sites: the hidden width x width layers only (the first has rank <= the input
        dimension, the last rank 1). Metrics on the source PDE.

Metrics (PINNacle): ``l2re`` (primary), ``l1re``, ``maxe``, ``mse`` of the network against the reference on a regular
test grid of ``test_grid`` points per axis; ``l2re_pretrained`` (the pretrained network on the evaluated problem,
i.e. before any fine-tuning or compression) and ``final_loss`` (the PINN loss of the evaluated network).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from rankbench.api import ADAPTATION, TRAINING, PluginParams, hookimpl
from rankbench.cells import derived_seed
from rankbench.kinds import KindChosenByParameter
from rankbench.kinds.adaptation import AdaptsCompressionModel, lbfgs_minimise
from rankbench.kinds.compression import cached_weights
from rankbench.kinds.training import TrainingSettings, TrainingTask, trained_dense_network
from rankbench_plugins.tasks import _pde

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rankbench_plugins.tasks._networks import TanhMLP

CACHE_VERSION = 1


class PINNParams(PluginParams):
    pde: Literal["burgers", "convection", "helmholtz", "poisson"] = "convection"
    source: float | None = Field(None, description="PDE parameter of pretraining (None: the family's default)")
    target: float | None = Field(None, description="PDE parameter to fine-tune on (adaptation; None: the source)")
    problem: Literal["adaptation", "compression", "training"] = "adaptation"
    width: int = Field(50, ge=1, description="units per hidden layer")
    depth: int = Field(4, ge=1, description="hidden layers")
    pretrain_steps: int = Field(3000, ge=0, description="Adam steps on the source parameter (cached); training: "
                                "the steps of every training cell")
    epoch_steps: int = Field(100, ge=1, description="training: full-batch steps per epoch (rank curves per epoch)")
    steps: int = Field(1000, ge=1, description="fine-tuning steps per adaptation cell")
    retrain_steps: int = Field(300, ge=0, description="steps after a post-hoc rank selection (part of steps)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of pretraining and of full fine-tuning (reference)")
    lbfgs_steps: int = Field(0, ge=0, description="L-BFGS iterations after the Adam steps of pretraining (PINNacle "
                             "trains its baselines with Adam, then L-BFGS); 0: Adam only")
    finetune_lbfgs_steps: int = Field(0, ge=0, description="adaptation: L-BFGS iterations after the Adam steps, at "
                                      "the final ranks, in every cell and in the full fine-tuning reference; 0: Adam "
                                      "only")
    adapter_lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the adapters")
    n_interior: int = Field(1000, ge=1, description="interior collocation points")
    n_boundary: int = Field(200, ge=1, description="boundary / initial points (and periodic pairs)")
    test_grid: int = Field(64, ge=2, description="test points per axis")

    @model_validator(mode="after")
    def _check(self) -> PINNParams:
        if self.retrain_steps >= self.steps:
            raise ValueError(f"retrain_steps ({self.retrain_steps}) must be smaller than steps ({self.steps})")
        for key in ("source", "target"):
            value = getattr(self, key)
            if value is not None:
                try:
                    problem = _pde.make_problem(self.pde, value)
                    problem.reference(problem.test_grid(2))  # the reference solver refuses what it cannot solve
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        return self


@dataclass
class Collocation:
    interior: torch.Tensor
    boundary: torch.Tensor
    boundary_values: torch.Tensor
    periodic: tuple[torch.Tensor, torch.Tensor] | None


class PINN(KindChosenByParameter, AdaptsCompressionModel, TrainingTask):
    name = "pinn"
    version = "1"
    description = "PINN (tanh MLP) pretrained on one PDE parameter: LoRA adaptation to another, or compression"
    Params = PINNParams
    primary_metric = "l2re"
    # device auto keeps it on the CPU: measured 2.4-15x slower on an H200 than on 8 CPU threads (a tanh MLP of width
    # tens on a few thousand points is launch-bound); --device cuda still runs it there
    gpu_benefit = False

    @property
    def from_scratch(self) -> bool:
        """``problem: training``: the network is trained from scratch (its compression cells compress that dense
        network, and its sites are the hidden layers); otherwise it is pretrained on the source problem."""
        return self.params.problem == TRAINING

    @classmethod
    def conformance_params(cls) -> list[dict]:
        tiny = {"pde": "poisson", "source": 1, "width": 8, "depth": 2, "pretrain_steps": 20, "n_interior": 64,
                "n_boundary": 16, "test_grid": 16}
        return [
            {**tiny, "problem": "adaptation", "target": 2, "steps": 6, "retrain_steps": 3},
            {**tiny, "problem": "compression"},
            {**tiny, "problem": "training", "epoch_steps": 10},
        ]

    # -- problems and points --------------------------------------------------------------------------------------
    def source_problem(self) -> _pde.PDEProblem:
        return _pde.make_problem(self.params.pde, self.params.source)

    def target_problem(self) -> _pde.PDEProblem:
        p = self.params
        return _pde.make_problem(p.pde, p.target if p.target is not None else p.source)

    def evaluated_problem(self) -> _pde.PDEProblem:
        return self.target_problem() if self.params.problem == ADAPTATION else self.source_problem()

    def collocation(self, ctx, problem: _pde.PDEProblem) -> Collocation:
        """Fixed points for ``problem``, drawn once per task seed and parameter value."""
        def draw() -> Collocation:
            import torch

            p = self.params
            generator = torch.Generator().manual_seed(derived_seed(ctx.task_seed, "points", problem.param))
            boundary = problem.boundary_points(p.n_boundary, generator)
            return Collocation(
                interior=problem.interior_points(p.n_interior, generator).to(ctx.device),
                boundary=boundary.to(ctx.device),
                boundary_values=problem.boundary_values(boundary).to(ctx.device),
                periodic=_to(problem.periodic_pairs(p.n_boundary, generator), ctx.device),
            )

        return ctx.memo(("pinn_points", problem.family, problem.param, ctx.task_seed), draw)

    def pinn_loss(self, model: nn.Module, problem: _pde.PDEProblem, points: Collocation) -> torch.Tensor:
        import torch

        with torch.enable_grad():
            loss = problem.residual(model, points.interior).pow(2).mean()
            loss = loss + (model(points.boundary) - points.boundary_values).pow(2).mean()
            if points.periodic is not None:
                left, right = points.periodic
                loss = loss + (model(left) - model(right)).pow(2).mean()
        return loss

    # -- the pretrained network (CompressionTask.load_model, memoised by model_key) ----------------------------------
    def model_key(self, ctx):
        return ctx.task_seed

    def calibration_key(self, ctx):
        return ctx.task_seed

    def load_model(self, ctx) -> nn.Module:
        if self.from_scratch:  # the dense network of the training kind (trained like every training cell)
            return trained_dense_network(self, ctx)
        model = cached_weights(self.seeded_network(ctx), self.network_path(ctx, "pretrained"),
                               lambda m: self.pretrain(ctx, m, self.source_problem()))
        return model.to(ctx.device).eval()

    def network_path(self, ctx, kind: str) -> Path:
        """Where the network trained on the source problem is cached: ``pretrained`` (the compression and adaptation
        kinds) or ``scratch`` (the training kind's dense reference)."""
        p = self.params
        config = {
            "version": CACHE_VERSION, "pde": p.pde, "source": self.source_problem().param, "width": p.width,
            "depth": p.depth, "steps": p.pretrain_steps, "lr": p.lr, "n_interior": p.n_interior,
            "n_boundary": p.n_boundary, "seed": ctx.task_seed,
        }
        if kind != "pretrained":
            config["kind"] = kind
        if p.lbfgs_steps:
            config["lbfgs_steps"] = p.lbfgs_steps
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return Path(ctx.cache_dir) / f"{kind}-{p.pde}-{digest}.pt"

    def pretrain(self, ctx, model: nn.Module, problem: _pde.PDEProblem) -> None:
        import torch

        points = self.collocation(ctx, problem)
        model.to(ctx.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.params.lr)
        for _ in range(self.params.pretrain_steps):
            optimizer.zero_grad(set_to_none=True)
            self.pinn_loss(model, problem, points).backward()
            optimizer.step()
        if self.params.lbfgs_steps:
            lbfgs_minimise(list(model.parameters()), lambda: self.pinn_loss(model, problem, points),
                           self.params.lbfgs_steps)
        model.cpu()

    def target_sites(self, model: nn.Module) -> dict[str, nn.Linear]:
        if self.from_scratch:  # the width x width hidden layers (the first and last have rank <= input dim / 1)
            return {f"layers.{i}": model.layers[i] for i in range(1, len(model.layers) - 1)}
        return {f"layers.{i}": layer for i, layer in enumerate(model.layers)}

    def seeded_network(self, ctx) -> TanhMLP:
        import torch

        from rankbench_plugins.tasks._networks import TanhMLP

        problem, p = self.source_problem(), self.params
        return TanhMLP(problem.lower, problem.upper, p.width, p.depth,
                       torch.Generator().manual_seed(derived_seed(ctx.task_seed, "init")))

    # -- training hooks (``problem: training``: Adam, full batch, on the source problem) ----------------------------
    def fresh_model(self, ctx) -> nn.Module:
        return self.seeded_network(ctx).to(ctx.device).train()

    def training_batches(self, ctx, epoch: int):
        points = self.collocation(ctx, self.source_problem())
        p = self.params
        return [points] * min(p.epoch_steps, p.pretrain_steps - (epoch - 1) * p.epoch_steps)

    def batch_loss(self, model: nn.Module, batch: Collocation) -> torch.Tensor:
        return self.pinn_loss(model, self.source_problem(), batch)

    def training_settings(self) -> TrainingSettings:
        p = self.params
        return TrainingSettings(epochs=math.ceil(p.pretrain_steps / p.epoch_steps), lr=p.lr, optimizer="adam")

    def dense_cache_path(self, ctx) -> Path:
        return self.network_path(ctx, "scratch")

    # -- compression hooks ----------------------------------------------------------------------------------------
    def calibration_batches(self, ctx) -> list[Collocation]:
        return [self.collocation(ctx, self.source_problem())]

    def calibration_loss(self, model: nn.Module, batch: Collocation) -> torch.Tensor:
        return self.pinn_loss(model, self.source_problem(), batch)

    def evaluate(self, ctx, model: nn.Module) -> None:
        import torch

        problem = self.evaluated_problem()
        grid, reference = self._test_set(ctx, problem)
        with torch.no_grad():
            errors = _pde.relative_errors(model(grid), reference)
        for name, value in errors.items():
            ctx.metric(name, value, "", False)
        ctx.metric("final_loss", float(self.pinn_loss(model, problem, self.collocation(ctx, problem)).detach()), "",
                   False)
        if not self.from_scratch:
            ctx.metric("l2re_pretrained", self._pretrained_l2re(ctx), "", False)

    def setup(self, ctx) -> None:
        if not self.from_scratch:
            self._pretrained_l2re(ctx)  # while the memoised network is dense (compression cells swap its sites)

    def _pretrained_l2re(self, ctx) -> float:
        problem = self.evaluated_problem()
        key = ("pinn_pretrained_l2re", problem.family, problem.param, ctx.task_seed, self.params.test_grid)

        def l2re() -> float:
            import torch

            grid, reference = self._test_set(ctx, problem)
            with torch.no_grad():
                return _pde.relative_errors(self.model(ctx)(grid), reference)["l2re"]

        return ctx.memo(key, l2re)

    def _test_set(self, ctx, problem: _pde.PDEProblem) -> tuple[torch.Tensor, torch.Tensor]:
        def test_set() -> tuple[torch.Tensor, torch.Tensor]:
            grid = problem.test_grid(self.params.test_grid)
            return grid.to(ctx.device), problem.reference(grid).to(ctx.device)

        return ctx.memo(("pinn_test", problem.family, problem.param, self.params.test_grid), test_set)

    # -- adaptation (``AdaptsCompressionModel``: the pretrained network, LoRA fine-tuned on the target problem) -----
    def training_loss(self, ctx, model: nn.Module) -> torch.Tensor:
        problem = self.target_problem()
        return self.pinn_loss(model, problem, self.collocation(ctx, problem))


def _to(pair, device):
    return None if pair is None else (pair[0].to(device), pair[1].to(device))


@hookimpl
def rankbench_register_tasks(register):
    register(PINN)
