"""``sltrain``: sparse plus low-rank pre-training -- Han, Li, Huang, Hong, Takeda, Jawanpuria & Mishra, "SLTrain: a
sparse plus low-rank approach for parameter and memory efficient pretraining", NeurIPS 2024 (arXiv 2406.02214);
``docs/algorithms.md#sltrain``. Reference code: andyjm3/SLTrain (``splora/splora_linear.py``, the scripts in
``scripts/llm_pretrain``).

Every site Linear (W: m x n, out x in) is replaced, from scratch, by

    W = (alpha / r) B A + S,     B (m x r),  A (r x n),  S = P_Omega(values)                                  (1)

where Omega is a support of nnz = floor(delta m n) entries drawn uniformly at random without replacement once, when
the layer is built (a seeded ``randperm`` of the m n positions), and never changed; only the nnz values on it are
trained. Initialisation (the reference layer): B = 0, A Kaiming-uniform (a = sqrt 5, as LoRA's A), the values
uniform in [-1/sqrt(n), 1/sqrt(n)], the bias the site's own. So training starts from W = S, a sparse matrix. All
parameters (B, A, the values, biases and every parameter outside the sites) are trained by the task's optimiser on
the task's loss; there is no rank adaptation: ``ranks()`` is r and ``stored_params()`` is r (m + n) + nnz, exactly.

Parameters and defaults (the paper's LLaMA 60M run, ``sltrain60m.sh``)
---------------------------------------------------------------------
* ``density`` delta = 0.03 (``--sp_ratio 0.03``), ``alpha`` = 32 (``--lora_alpha 32``; scaling alpha / r).
* ``rank_fraction`` 0.25: r = ceil(0.25 min(m, n)) -- the paper's ranks are a quarter of the hidden size (60M:
  128 / 512); ``rank`` sets an absolute rank (clipped to min(m, n)).
* ``lr``: the task's (the paper's 60M run: AdamW lr 3e-3 with warm-up and cosine decay, no weight decay).

Deviations from the paper
-------------------------
* The paper applies SLTrain to the attention and MLP matrices of LLaMA and keeps embeddings and the head dense;
  here every site the task names is replaced (the classifier's output layer included).
* The forward is the reference's memory-efficient one (``_sltrain_layers.SparsePlusLowRankLinear``, a custom
  autograd function as the reference's ``sparse_linear.cpp``): W of (1) is formed only transiently (in the forward
  to compute y, in the backward to compute dL/dx), and autograd saves x, B, A, the values and the support -- never
  W. Gradients: dL/dB = (alpha/r) G^T X A^T, dL/dA = (alpha/r) B^T G^T X, dL/dvalues = (G^T X)[Omega], formed from
  the transient out x in G^T X (as the reference). ``benchmarks/memory/sltrain_memory.py`` measures the step's peak
  memory against the naive forward (``SLTrainLinear.forward_dense``) and ``nn.Linear``. Pure PyTorch, no compiled
  extension.
* No learning-rate schedule (the task's constant rate, as for every trainer here).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.training import RankAdaptiveTrainer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rankbench.kinds.training import TrainingRun
    from rankbench_plugins.trainers._sltrain_layers import SLTrainLinear


class SLTrainParams(PluginParams):
    density: float = Field(0.03, gt=0.0, lt=1.0, description="delta: fraction of entries on the sparse support "
                                                             "(the paper: 0.03)")
    alpha: float = Field(32.0, gt=0.0, description="scale of the low-rank part, applied as alpha / r (the paper: 32)")
    rank_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="rank as a fraction of min(m, n), rounded up (the paper: a quarter of the hidden size); "
                    "ignored when rank is set",
    )
    rank: int | None = Field(None, ge=1, description="absolute rank (clipped to min(m, n))")
    lr: float | None = Field(None, gt=0.0, description="learning rate; None = the task's")


class SLTrain(RankAdaptiveTrainer):
    name = "sltrain"
    version = "2"
    description = ("SLTrain (Han et al., NeurIPS 2024): W = (alpha/r) B A + S, S on a fixed random support of "
                   "density delta, trained from scratch.")
    Params = SLTrainParams
    formats: ClassVar[frozenset[str]] = frozenset({"svd"})

    def layer_rank(self, out_features: int, in_features: int) -> int:
        full = min(out_features, in_features)
        wanted = self.params.rank if self.params.rank is not None else math.ceil(self.params.rank_fraction * full)
        return max(1, min(int(wanted), full))

    def make_layer(self, site: nn.Linear, generator: torch.Generator) -> SLTrainLinear:
        from rankbench_plugins.trainers._sltrain_layers import SLTrainLinear

        out_features, in_features = site.weight.shape
        p = self.params
        return SLTrainLinear(out_features, in_features, self.layer_rank(out_features, in_features), p.density,
                             p.alpha, site.bias, generator, dtype=site.weight.dtype, device=site.weight.device)

    def train(self, run: TrainingRun) -> None:
        import torch

        generator = torch.Generator(device="cpu").manual_seed(int(getattr(run.ctx, "seed", 0)))
        for name, site in run.sites.items():
            run.replace(name, self.make_layer(site, generator))
        run.fit(run.optimizer(run.model.parameters(), self.params.lr))


@hookimpl
def rankbench_register_selectors(register):
    register(SLTrain)
