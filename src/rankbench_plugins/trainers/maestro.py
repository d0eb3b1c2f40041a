"""``maestro``: trainable low-rank layers by low-rank ordered decomposition (LoD) -- Horváth, Laskaridis, Rajput &
Wang, "Maestro: Uncovering Low-Rank Structures via Trainable Decomposition", ICML 2024 (arXiv 2308.14929);
``docs/algorithms.md#maestro``. Reference code: SamuelHorvath/Maestro-LoD (``maestro/layers/linear.py``,
``maestro/samplers/single_layer.py``, ``maestro/layers/utils.py``, ``cifar_mnist_main.py``, ``maestro_opts.py``).

Model. Every site Linear W (out x in) becomes W = U V^T, U (out x d), V (in x d), d = min(out, in), started from
the site's initial weight by its SVD, U = P sqrt(s), V = Q sqrt(s) (the reference's ``decompose_linear``). With the
first b components only, the layer is W_b = U[:, :b] V[:, :b]^T.

Ordered dropout (LoD). Per minibatch one (layer i, rank b) pair is drawn, uniformly among all pairs with
b in 1..d_i (d_i: the layer's current rank), i.e. layer i with probability d_i / sum_j d_j and b uniform in 1..d_i
-- the reference's ``per_layer`` sampler ("one layer at a time", used in the paper): it shuffles the list of all
pairs and walks through it, reshuffling when it is exhausted and rebuilding it after every shrinking. Layer i runs
at rank b, every other layer at its current rank d_j, and the step minimises

    L_LoD = L(network with W_i = W_i,b) + lambda_gl * sum_layers sum_{k=1..d} ( ||V[:, k:]||_F + ||U[:, k:]||_F )   (1)

(the task's loss; the second term is the hierarchical group lasso: component k is penalised through every nested
group containing it, so later components shrink first) with the task's optimiser. With ``full_pass`` the loss of
the network at its current ranks is added (the reference's default; see the deviations).

Progressive shrinking. After every epoch each layer keeps the components whose importance

    I_k = ||V[:, k:]||_F * ||U[:, k:]||_F      (non-increasing in k, so a prefix is kept)                       (2)

is at least ``threshold`` eps_ps; the others leave the layer for good: the forward pass, the sampler and the group
lasso (1) run over the kept components only (the sums over k in (1) and (2) stop at d_i). ``ranks()`` is the kept
count d_i; ``stored_params()`` is d_i (out + in). The evaluated network is the one at the kept ranks.

Why ordering emerges (the paper's linear-case result, checked in the tests): for y = W x with E[x x^T] = I and the
squared loss, the minimiser of E_b ||U_b V_b^T x - W x||^2 over b uniform makes every prefix U_b V_b^T the best
rank-b approximation of W, i.e. U and V span W's leading singular subspaces in order.

Parameters and defaults
-----------------------
* ``group_lasso`` lambda_gl = 5e-3 (``--gp-lambda``'s default in ``maestro_opts.py``; the example script uses 1e-6).
* ``threshold`` eps_ps = 1e-5 (``--importance-threshold``'s default).
* ``full_pass`` False: the objective (1) alone (the example script's ``--no-full-pass``).
* ``progressive`` True: shrink after every epoch (the example script's ``--progressive``).
* ``optimizer`` sgd: the reference's SGD with momentum 0.9 and weight decay 1e-4 at lr 0.01 (its LeNet script; 0.1 on
  CIFAR), for every parameter of the network; ``task`` trains with the task's optimiser instead. With Adam the
  weights of unneeded components keep jittering at the scale of its step (~lr per entry), so their importance (2)
  stays above eps_ps = 1e-5 much longer: on the MNIST MLP (50 epochs, seed 0) Adam at 1e-3 kept 305 of 522
  components (param_ratio 0.95, accuracy 0.910), the reference's SGD 17 (0.039, 0.899).

Deviations from the paper / reference
-------------------------------------
* ``full_pass``: the reference adds the full network's loss and trains the sampled pass on the full network's
  softened outputs (self-distillation); here the sampled pass uses the task's own loss (labels), as the task's loss
  is the only loss the training kind offers (it is not always a classification loss). Off by default.
* Shrinking is permanent. The reference re-evaluates (2) over all d components after every epoch and keeps the
  removed ones in the optimiser and in the group lasso, so a removed component whose importance rises back above
  eps_ps returns. Measured on the MNIST MLP (SGD, lambda_gl 5e-3): the removed components' importances hover at
  1.5-2.3e-5 (the lasso sub-gradient's oscillation around zero), just above eps_ps, and the first layer went 512 ->
  491 -> 395 -> 512 kept over epochs 3-5; after 50 epochs 511 of 512 were kept. Here removed components are out of the layer
  (the reference's ``prune=True`` layer, which it builds for deployment).
* By default the optimiser is the reference's SGD, not the task's (as ``dlrt`` keeps its paper's SGD), and the
  learning rate is constant (the reference's LeNet schedule is constant too).
* Conv kernels are not supported here (the reference decomposes Conv2d too, as out x (in kh kw) products).
* Sites whose decomposition stores more than the dense weight are not converted back to dense layers (the
  reference's ``model_to_full`` for deployment); the stored parameters count d (out + in) regardless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.training import RankAdaptiveTrainer

if TYPE_CHECKING:
    import torch

    from rankbench.kinds.training import TrainingRun
    from rankbench_plugins.trainers._maestro_layers import MaestroLinear


REFERENCE_SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}  # Maestro-LoD's LeNet run (run_cifar_mnist.sh)


class MaestroParams(PluginParams):
    group_lasso: float = Field(
        5e-3, ge=0.0,
        description="lambda_gl of the hierarchical group lasso (the reference's default --gp-lambda 5e-3)",
    )
    threshold: float = Field(
        1e-5, ge=0.0,
        description="eps_ps: components with importance ||V[:,k:]|| ||U[:,k:]|| below it are shrunk away after "
                    "each epoch (the reference's default)",
    )
    progressive: bool = Field(True, description="shrink after every epoch (the reference's --progressive)")
    full_pass: bool = Field(
        False,
        description="add the loss of the network at its current ranks to the sampled pass's (the reference's "
                    "default; its example script turns it off)",
    )
    optimizer: Literal["sgd", "task"] = Field(
        "sgd",
        description="'sgd': the reference's SGD (momentum 0.9, weight decay 1e-4) at lr (default 0.01, its LeNet "
                    "rate); 'task': the task's optimiser at lr (default the task's rate)",
    )
    lr: float | None = Field(None, gt=0.0, description="learning rate; None = 0.01 for sgd, the task's for task")


class PerLayerSampler:
    """The reference's ``per_layer`` sampler: every (layer, rank b) pair with b in 1..width once per pass, in a
    seeded random order; ``reset`` rebuilds the pairs for new widths."""

    def __init__(self, widths: list[int], generator: torch.Generator):
        self.generator = generator
        self.reset(widths)

    def reset(self, widths: list[int]) -> None:
        self.pairs = [(layer, b) for layer, width in enumerate(widths) for b in range(1, width + 1)]
        self.order: list[int] = []

    def __next__(self) -> tuple[int, int] | None:
        import torch

        if not self.pairs:
            return None
        if not self.order:
            self.order = torch.randperm(len(self.pairs), generator=self.generator).tolist()
        return self.pairs[self.order.pop()]


class Maestro(RankAdaptiveTrainer):
    name = "maestro"
    version = "1"
    description = ("Maestro (Horváth et al., ICML 2024): W = U V^T trained with ordered dropout over ranks, a "
                   "hierarchical group lasso and progressive shrinking of unimportant components.")
    Params = MaestroParams
    formats: ClassVar[frozenset[str]] = frozenset({"svd"})

    def train(self, run: TrainingRun) -> None:
        import torch

        from rankbench_plugins.trainers._maestro_layers import MaestroLinear

        layers = []
        for name, site in run.sites.items():
            layer = MaestroLinear.from_linear(site)
            run.replace(name, layer)
            layers.append(layer)
        generator = torch.Generator(device="cpu").manual_seed(int(getattr(run.ctx, "seed", 0)))
        sampler = PerLayerSampler([layer.kept for layer in layers], generator)
        optimizer = self.optimizer(run)
        for epoch, batches in run.epochs():
            losses = []
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                task_loss, total = lod_loss(layers, sampler, lambda batch=batch: run.loss(batch), self.params)
                total.backward()
                optimizer.step()
                losses.append(task_loss)
            if self.params.progressive:
                for layer in layers:
                    layer.shrink(self.params.threshold)
                sampler.reset([layer.kept for layer in layers])
            run.end_epoch(epoch, sum(losses) / max(len(losses), 1))


    def optimizer(self, run: TrainingRun):
        import torch

        p = self.params
        if p.optimizer == "task":
            return run.optimizer(run.model.parameters(), p.lr)
        lr = REFERENCE_SGD["lr"] if p.lr is None else p.lr
        return torch.optim.SGD(run.model.parameters(), lr=lr, momentum=REFERENCE_SGD["momentum"],
                               weight_decay=REFERENCE_SGD["weight_decay"])


def lod_loss(layers: list[MaestroLinear], sampler: PerLayerSampler, loss, params: MaestroParams
             ) -> tuple[float, torch.Tensor]:
    """(the sampled pass's task loss, the objective (1)) for one minibatch; ``loss()`` is the task's loss of the
    network as its layers are set."""
    total = loss() if params.full_pass else 0.0
    pair = next(sampler)
    if pair is not None:
        layers[pair[0]].active_rank = pair[1]
    try:
        sampled = loss()
    finally:
        if pair is not None:
            layers[pair[0]].active_rank = None
    total = total + sampled
    if params.group_lasso > 0:
        total = total + params.group_lasso * sum(layer.group_lasso() for layer in layers)
    return float(sampled.item()), total


@hookimpl
def rankbench_register_selectors(register):
    register(Maestro)
