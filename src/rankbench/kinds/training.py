"""The ``training`` problem kind: ranks learned while a network is trained from scratch.

Some methods do not pick ranks for a finished model: they *learn* them during training (DLRT, TDLRT, Bayesian
tensorized layers with ARD). This kind runs them beside the dense network and beside post-hoc selection, at the same
data, initialisation, loss, optimiser defaults and epoch budget.

Task side (``TrainingTask``). A task supplies

* ``fresh_model(ctx)``: the network at its seeded initialisation (identical for every cell of one task seed);
* ``target_sites(model)``: the layers a method may replace -- Linear layers, and ``Conv2d`` kernels for methods
  that declare ``conv_sites`` (``cnn-classification``);
* ``training_batches(ctx, epoch)``: the minibatches of one epoch (the order is seeded by task seed and epoch, so
  every method sees the same stream), ``batch_loss(model, batch)`` and ``training_settings()`` (epochs, optimiser,
  learning rate, weight decay);
* ``evaluate(ctx, model)``: its metrics.

Method side. A rank-adaptive method is a selector derived from ``RankAdaptiveTrainer``. The cell's factorization
names the layer *format* the method trains in (``svd``: a matrix factorization, ``tucker`` / ``cp`` / ``tt`` /
``ttm``: a tensorized weight as the compression kind defines them); the method says which formats it supports. It
is handed a ``TrainingRun``: it replaces each site by its own layer (a ``RankAdaptiveLayer``, which reports its
current ranks and stored parameters), trains the whole network for the task's epochs with its own rank-update rule,
and calls ``run.end_epoch`` after each epoch, which records the rank trajectory.

Cells of a training task:

* the dense reference trains the unfactorized network with the task's optimiser (phase ``train``; the weights are
  also cached on disk for the post-hoc cells);
* a ``RankAdaptiveTrainer`` x its format trains with learned ranks (phase ``train``), budget-free;
* any compression selector x factorization compresses the dense network trained by the reference protocol at the
  suite's ``param_ratio`` budgets (the compression kind, unchanged), so learned ranks are compared with ranks
  chosen after training at equal parameter ratio.

Recorded per training cell: ``params`` (the site layers' stored parameters at the final ranks; the dense cell: the
sites' weights), ``param_ratio`` (over the sites' dense parameters), ``rank_total``, ``epochs``, the ranks table,
and the curves ``train_loss`` (mean over each epoch), ``rank_total``, ``param_ratio`` and ``rank:<site>`` (per epoch;
a tensor site's slot ranks summed). Epoch 0 of each rank curve is the initial rank.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TYPE_CHECKING

from rankbench.api import COMPRESSION, PARAM_RATIO, TRAINING, Diverged, Factorization, Selector, Task, lazy_attributes
from rankbench.kinds.protocol import Protocol
from rankbench.kinds.compression import CompressionTask, cached_weights, save_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rankbench.kinds.layers import RankAdaptiveLayer


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    epochs: int
    lr: float
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only


def make_optimizer(settings: TrainingSettings, params: Iterable[nn.Parameter], lr: float | None = None):
    """The task's optimiser over ``params`` (``lr`` overrides the task's learning rate)."""
    import torch
    params = [p for p in params if p.requires_grad]
    lr = settings.lr if lr is None else lr
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=settings.weight_decay)


class TrainingTask(Task):
    """What a task of the training kind supplies: a seeded fresh network, its sites, the minibatch stream, the loss,
    the optimiser settings and the evaluation. ``run_training`` / ``run_training_reference`` are the protocol.

    A training task that is also a ``CompressionTask`` speaks ``compression`` too, with the dense network trained by
    the reference protocol as its model (its ``load_model`` returns ``trained_dense_network``), so post-hoc
    selectors compress exactly what the reference cell trained."""

    problem_kind: ClassVar[str] = TRAINING
    budget_kind: ClassVar[str | None] = PARAM_RATIO

    @property
    def problem_kinds(self) -> frozenset[str]:
        """Training, and compression of the trained dense network where the task supplies that kind's capabilities."""
        return frozenset({TRAINING, COMPRESSION}) if isinstance(self, CompressionTask) else frozenset({TRAINING})

    @abc.abstractmethod
    def fresh_model(self, ctx) -> nn.Module:
        """The network at its seeded initialisation, on ``ctx.device``, in train mode."""

    @abc.abstractmethod
    def target_sites(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Qualified name -> Linear for every layer a rank-adaptive method may replace, in model order."""

    @abc.abstractmethod
    def training_batches(self, ctx, epoch: int) -> Iterable[Any]:
        """The minibatches of epoch ``epoch`` (1-based), in an order seeded by the task seed and the epoch."""

    @abc.abstractmethod
    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of the model on one minibatch."""

    @abc.abstractmethod
    def training_settings(self) -> TrainingSettings:
        """Epochs, optimiser, learning rate and weight decay of every training cell."""

    @abc.abstractmethod
    def evaluate(self, ctx, model: nn.Module) -> None:
        """Record the task's quality metrics for a trained ``model`` through ``ctx.metric``."""

    def dense_cache_path(self, ctx) -> Path | None:
        """Where the dense trained weights of this configuration and seed are cached (None: no disk cache)."""
        return None


def trained_dense_network(task: TrainingTask, ctx) -> nn.Module:
    """The dense network trained by the reference protocol (from the disk cache when the reference cell, or another
    process, already trained it), in eval mode: what the compression cells of a training task compress."""
    model = cached_weights(task.fresh_model(ctx), task.dense_cache_path(ctx), lambda m: train_dense(task, ctx, m))
    return model.eval()


def training_skip(task: TrainingTask, selector: Selector, factorization: Factorization) -> str | None:
    if not isinstance(selector, RankAdaptiveTrainer):
        return f"selector {selector.name} does not learn ranks while training"
    return selector.format_skip(factorization)


def run_training_reference(task: TrainingTask, ctx) -> None:
    """Train the unfactorized network with the task's optimiser; its weights are cached for the compression cells."""
    model = task.fresh_model(ctx)
    with ctx.phase("train"):
        run = train_dense(task, ctx, model)
    path = task.dense_cache_path(ctx)
    if path is not None:  # the compression cells of this task load what the reference trained
        save_weights(path, model)
    run.write_curves()
    model.eval()
    with ctx.phase("evaluate"):
        task.evaluate(ctx, model)
    ctx.record_size(run.dense_params, run.dense_params)
    ctx.metric("epochs", run.settings.epochs)


class RankAdaptiveTrainer(Selector):
    """Base of a method that learns ranks while training: it chooses no ranks for a given model, so it runs
    budget-free and only on training tasks, in the layer formats (factorization names) it lists."""

    problem_kinds: ClassVar[frozenset[str]] = frozenset({TRAINING})
    formats: ClassVar[frozenset[str]]
    conv_sites: ClassVar[bool] = False  # whether the method can replace Conv2d sites (4-mode kernels) too

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def format_skip(self, factorization: Factorization) -> str | None:
        if factorization.name not in self.formats:
            return f"{self.name} trains {'/'.join(sorted(self.formats))} layers, not {factorization.name}"
        return None

    def select(self, problem):
        raise TypeError(f"{self.name} learns ranks during training; it does not select them for a given model")

    @abc.abstractmethod
    def train(self, run: TrainingRun) -> None:
        """Replace every site (``run.replace``) and train ``run.settings.epochs`` epochs, calling
        ``run.end_epoch(epoch, mean_loss)`` after each."""


@dataclasses.dataclass
class TrainingRun:
    """One training cell's network and loop, as a rank-adaptive method sees it."""

    task: TrainingTask
    ctx: Any
    model: nn.Module
    settings: TrainingSettings
    factorization: Factorization | None
    sites: dict[str, nn.Linear]  # the initial dense site Linears
    layers: dict[str, RankAdaptiveLayer] = dataclasses.field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)

    def replace(self, name: str, layer: RankAdaptiveLayer) -> None:
        self.model.set_submodule(name, layer)
        self.layers[name] = layer

    def epochs(self) -> Iterator[tuple[int, Iterable[Any]]]:
        """(epoch, its minibatches) for every epoch of the budget; records the initial ranks first."""
        self._record_ranks(0)
        for epoch in range(1, self.settings.epochs + 1):
            self.model.train()
            yield epoch, self.task.training_batches(self.ctx, epoch)

    def loss(self, batch: Any) -> torch.Tensor:
        return self.task.batch_loss(self.model, batch)

    def optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None):
        return make_optimizer(self.settings, params, lr)

    def fit(self, *optimizers) -> None:
        """Every epoch of the budget with plain steps: per minibatch, zero the gradients, backpropagate the task's
        loss and step each optimiser (in the order given); the epoch's mean loss is recorded (``end_epoch``)."""
        for epoch, batches in self.epochs():
            losses = []
            for batch in batches:
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss = self.loss(batch)
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                losses.append(loss.item())
            self.end_epoch(epoch, sum(losses) / max(len(losses), 1))

    def parameters_outside_layers(self) -> list[nn.Parameter]:
        """The network's parameters that no replaced layer owns (embeddings, norms, the unreplaced layers...)."""
        inside = {id(p) for layer in self.layers.values() for p in layer.parameters()}
        return [p for p in self.model.parameters() if id(p) not in inside]

    def end_epoch(self, epoch: int, mean_loss: float) -> None:
        if not math.isfinite(mean_loss):
            raise Diverged(f"training loss is {mean_loss} after epoch {epoch}")
        self.curves.setdefault("train_loss", []).append((epoch, mean_loss))
        self._record_ranks(epoch)

    def _record_ranks(self, epoch: int) -> None:
        if not self.layers:
            return
        total = params = 0
        for name, layer in self.layers.items():
            rank = _rank_sum(layer.ranks())
            total += rank
            params += layer.stored_params()
            self.curves.setdefault(f"rank:{name}", []).append((epoch, rank))
        self.curves.setdefault("rank_total", []).append((epoch, total))
        self.curves.setdefault("param_ratio", []).append((epoch, params / self.dense_params))

    @property
    def dense_params(self) -> int:
        return sum(linear.weight.numel() for linear in self.sites.values())

    def write_curves(self) -> None:
        for name, points in self.curves.items():
            self.ctx.curve(name, [v for _, v in points], [s for s, _ in points])


def _rank_sum(ranks: int | tuple[int, ...]) -> int:
    return int(ranks) if isinstance(ranks, int) else int(sum(ranks))


def train_dense(task: TrainingTask, ctx, model: nn.Module) -> TrainingRun:
    """Plain training of every weight with the task's optimiser: the dense reference (and the post-hoc cells'
    model)."""
    settings = task.training_settings()
    run = TrainingRun(task, ctx, model, settings, None, dict(task.target_sites(model)))
    run.fit(run.optimizer(model.parameters()))
    return run


def run_training(task: TrainingTask, ctx, method: RankAdaptiveTrainer, factorization: Factorization) -> None:
    """One rank-adaptive training cell: fresh network, the method trains it, evaluate, record ranks and curves."""
    model = task.fresh_model(ctx)
    run = TrainingRun(task, ctx, model, task.training_settings(), factorization, dict(task.target_sites(model)))
    with ctx.phase("train"):
        method.train(run)
    missing = set(run.sites) - set(run.layers)
    if missing:
        raise RuntimeError(f"{method.name} left sites untrained in its format: {sorted(missing)}")
    model.eval()
    with ctx.phase("evaluate"):
        task.evaluate(ctx, model)
    kept = 0
    for name, layer in run.layers.items():
        params = layer.stored_params()
        kept += params
        ctx.ranks(name, layer.ranks(), params)
    ctx.record_size(kept, run.dense_params)
    ctx.metric("rank_total", sum(_rank_sum(layer.ranks()) for layer in run.layers.values()))
    ctx.metric("epochs", run.settings.epochs)
    run.write_curves()


PROTOCOL = Protocol(TRAINING, TrainingTask, run=run_training, reference=run_training_reference, skip=training_skip)


# these names live in layers (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(__name__, "rankbench.kinds.layers", {"RankAdaptiveLayer"})
