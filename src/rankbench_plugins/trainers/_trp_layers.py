"""The layer of ``trp`` (the method, its equations and choices: the docstring of ``trp``): ``TRPLayer`` wraps a site
(a Linear, or a Conv2d whose kernel is read as the out x (in kh kw) matrix of its flattened filters) whose dense
weight TRP trains and periodically replaces by its energy-truncated SVD. Imported when a run builds its layers
(torch)."""

from __future__ import annotations

import torch
from torch import nn

from rankbench.kinds.layers import RankAdaptiveLayer


class TRPLayer(RankAdaptiveLayer):
    """A site trained densely; ``rank`` is the rank its weight was last truncated to (the full rank before the
    first truncation). The forward is the wrapped module's own."""

    def __init__(self, site: nn.Linear | nn.Conv2d):
        super().__init__()
        self.site = site
        self.out_features = int(site.weight.shape[0])
        self.in_features = int(site.weight[0].numel())  # in, or in kh kw for a kernel
        self.rank = min(self.out_features, self.in_features)

    @property
    def weight(self) -> nn.Parameter:
        return self.site.weight

    def matrix(self) -> torch.Tensor:
        """The weight as an out x in matrix (a kernel: its flattened filters), a view sharing storage."""
        return self.site.weight.detach().reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.site(x)

    def ranks(self) -> int:
        return int(self.rank)

    def stored_params(self) -> int:
        return self.ranks() * (self.out_features + self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
