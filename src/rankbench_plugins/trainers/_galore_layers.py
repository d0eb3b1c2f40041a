"""The layer of ``galore`` (the method: the docstring of ``galore``): ``GaLoreSite`` wraps a site Linear whose full
weight is trained by GaLore's projected Adam; it reports the projection rank and the dense weight it stores. Imported
when a run builds its layers (torch)."""

from __future__ import annotations

import torch
from torch import nn

from rankbench.kinds.layers import RankAdaptiveLayer


class GaLoreSite(RankAdaptiveLayer):
    """A Linear trained at full rank; ``rank`` is the rank of the subspace its gradients are projected on."""

    def __init__(self, site: nn.Linear, rank: int):
        super().__init__()
        self.site = site
        self.out_features, self.in_features = (int(d) for d in site.weight.shape)
        self.rank = int(rank)

    @property
    def weight(self) -> nn.Parameter:
        return self.site.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.site(x)

    def ranks(self) -> int:
        return self.rank

    def stored_params(self) -> int:
        return self.out_features * self.in_features  # the weights stay full rank

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, projection_rank={self.rank}"
