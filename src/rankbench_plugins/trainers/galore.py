"""``galore``: Gradient Low-Rank Projection -- Zhao, Zhang, Chen, Wang, Anandkumar & Tian, "GaLore: Memory-Efficient
LLM Training by Gradient Low-Rank Projection", ICML 2024 (arXiv 2403.03507); ``docs/algorithms.md#galore``. The
optimiser is the authors' own package, PyPI ``galore-torch`` (``galore_torch.GaLoreAdamW``, requirement
``galore-torch>=1.0``), used unchanged.

GaLore is no rank-adaptive method: the weights stay full rank and only the optimiser's state lives in a rank-r
subspace. It is here as the fixed-rank baseline at equal optimiser-state memory: every cell records the optimiser
state it holds for the sites (``optimizer_state_bytes``) beside what dense Adam holds for the same weights
(``adam_state_bytes``, 2 m n floats).

Per site weight W (m x n, a Linear's out x in) and step t, with G_t = dL/dW (``galore_torch``'s ``std``
projection, which projects on the smaller side):

    if t mod T == 0:  U, s, V^T = svd(G_t)                     (the subspace is refreshed every T steps)
        m <= n:  P = U[:, :r]  (m x r),   R_t = P^T G_t  (r x n)
        m >  n:  Q = V^T[:r]   (r x n),   R_t = G_t Q^T  (m x r)
    M_t = b1 M_{t-1} + (1 - b1) R_t,   V_t = b2 V_{t-1} + (1 - b2) R_t^2          (Adam moments, r-sized)
    N_t = M_t / (sqrt(V_t) + eps),     eta_t = lr sqrt(1 - b2^t) / (1 - b1^t)
    W <- W - eta_t * alpha * (P N_t   or   N_t Q)                                    (projected back, scale alpha)
    W <- W - lr * weight_decay * W                                                  (decoupled decay)

The moments are kept across subspace refreshes (as the paper's algorithm and the package do). The optimiser state
per site is M and V (2 r max(m, n) floats) and the projection matrix (r min(m, n) floats) instead of Adam's 2 m n.
Every parameter outside the site weights (biases, unreplaced layers) is trained by the task's optimiser.

Parameters and defaults (the paper's LLaMA pre-training runs)
-------------------------------------------------------------
* ``rank_fraction`` 0.25: r = ceil(0.25 min(m, n)) -- the paper's ranks are a quarter of the hidden size (60M:
  128 / 512; 350M: 256 / 1024; 1B: 512 / 2048); ``rank`` sets an absolute rank instead (clipped to min(m, n)).
* ``update_proj_gap`` T = 200, ``scale`` alpha = 0.25 (the paper, all model sizes).
* ``lr``: the task's by default. The paper trains GaLore at lr 0.01 with alpha 0.25 (an effective step of 0.0025)
  against tuned full-rank baselines; ``lr`` sets GaLore's rate (applied to the site weights and, through the task's
  optimiser, to the other parameters).
* ``eps`` 1e-8 (torch.optim.Adam's, the dense reference's; the package's own default is 1e-6), betas (0.9, 0.999).

Deviations from the paper
-------------------------
* The paper applies GaLore to the attention and MLP matrices of transformers; here to every site the task names
  (the output layer of the classification MLP included). Conv kernels are not supported (the package projects
  matrices only).
* Weight decay is the task's, applied decoupled by the package's AdamW step for the site weights whatever the
  task's optimiser (Adam with L2 decay or SGD on the other parameters); the classification tasks use no decay.

What it is not: with r = min(m, n) GaLore does not reproduce Adam in the original coordinates -- Adam's per-entry
normalisation does not commute with the rotation P (or Q); it reproduces Adam run on the rotated weight P^T W
(or W Q^T) while the subspace is fixed, and Adam itself when the subspace is a signed permutation of the axes (the
tests check both).

``GaLoreSite`` lives in ``_galore_layers`` (torch); this module imports no torch at its top, and ``galore_torch``
(which imports transformers and bitsandbytes) only when a run trains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.training import RankAdaptiveTrainer

if TYPE_CHECKING:
    from torch import nn

    from rankbench.kinds.training import TrainingRun
    from rankbench_plugins.trainers._galore_layers import GaLoreSite


class GaLoreParams(PluginParams):
    rank_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="projection rank as a fraction of min(m, n), rounded up (the paper: a quarter of the hidden "
                    "size); ignored when rank is set",
    )
    rank: int | None = Field(None, ge=1, description="absolute projection rank (clipped to min(m, n))")
    update_proj_gap: int = Field(200, ge=1, description="T: steps between subspace refreshes (the paper: 200)")
    scale: float = Field(0.25, gt=0.0, description="alpha: scale of the projected-back update (the paper: 0.25)")
    lr: float | None = Field(None, gt=0.0, description="learning rate of every parameter; None = the task's")
    eps: float = Field(1e-8, gt=0.0, description="Adam's eps (torch.optim.Adam's; galore-torch's default is 1e-6)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's betas")


class GaLore(RankAdaptiveTrainer):
    name = "galore"
    version = "1"
    description = ("GaLore (Zhao et al., ICML 2024): full-rank weights, Adam moments on the gradients' rank-r "
                   "SVD subspace refreshed every T steps (galore-torch's GaLoreAdamW).")
    Params = GaLoreParams
    formats: ClassVar[frozenset[str]] = frozenset({"svd"})

    def projection_rank(self, out_features: int, in_features: int) -> int:
        full = min(out_features, in_features)
        wanted = self.params.rank if self.params.rank is not None else math.ceil(self.params.rank_fraction * full)
        return max(1, min(int(wanted), full))

    def train(self, run: TrainingRun) -> None:
        from rankbench_plugins.trainers._galore_layers import GaLoreSite

        layers = []
        for name, site in run.sites.items():
            layer = GaLoreSite(site, self.projection_rank(*site.weight.shape))
            run.replace(name, layer)
            layers.append(layer)
        lr = self.params.lr if self.params.lr is not None else run.settings.lr
        galore = galore_optimizer(layers, self.params, lr, run.settings.weight_decay)
        site_weights = {id(layer.weight) for layer in layers}
        others = [q for q in run.model.parameters() if id(q) not in site_weights and q.requires_grad]
        run.fit(galore, *([run.optimizer(others, lr)] if others else []))
        held = optimizer_state_bytes(galore, [layer.weight for layer in layers])
        adam = sum(2 * layer.weight.numel() * layer.weight.element_size() for layer in layers)
        run.ctx.metric("optimizer_state_bytes", held, "bytes", False)
        run.ctx.metric("adam_state_bytes", adam, "bytes", False)
        run.ctx.metric("optimizer_state_ratio", held / adam, "", False)


def galore_optimizer(layers: list[GaLoreSite], params: GaLoreParams, lr: float, weight_decay: float):
    """``galore_torch.GaLoreAdamW`` over the site weights, one parameter group per site (its own rank)."""
    from galore_torch import GaLoreAdamW

    groups = [{"params": [layer.weight], "rank": layer.rank, "update_proj_gap": params.update_proj_gap,
               "scale": params.scale, "proj_type": "std"} for layer in layers]
    return GaLoreAdamW(groups, lr=lr, betas=tuple(params.betas), eps=params.eps, weight_decay=weight_decay,
                       no_deprecation_warning=True)


def optimizer_state_bytes(optimizer, weights: list[nn.Parameter]) -> int:
    """Bytes of the tensors ``optimizer`` holds for ``weights``: Adam's moments and GaLore's projection matrices
    (scalar step counters excluded)."""
    import torch

    total = 0
    for weight in weights:
        for value in optimizer.state.get(weight, {}).values():
            tensors = [value] if isinstance(value, torch.Tensor) else [getattr(value, "ortho_matrix", None)]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.ndim)
    return int(total)


@hookimpl
def rankbench_register_selectors(register):
    register(GaLore)
