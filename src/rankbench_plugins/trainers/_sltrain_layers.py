"""The layer of ``sltrain`` (the method, its equations and defaults: the docstring of ``sltrain``): ``SLTrainLinear``,
W = (alpha / r) B A + S with S on a fixed random support. Imported when a run builds its layers (torch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankbench.kinds.layers import RankAdaptiveLayer


class SLTrainLinear(RankAdaptiveLayer):
    """y = x ((alpha / r) B A + S)^T + bias. B (out x r) starts at zero, A (r x in) Kaiming-uniform (a = sqrt 5),
    S's values uniform in +-1/sqrt(in) on ``support`` (flat indices into the out x in weight, a buffer that never
    changes)."""

    def __init__(self, out_features: int, in_features: int, rank: int, density: float, alpha: float,
                 bias: torch.Tensor | None, generator: torch.Generator, dtype=torch.float32, device=None):
        super().__init__()
        self.out_features, self.in_features, self.rank = int(out_features), int(in_features), int(rank)
        self.scaling = float(alpha) / self.rank
        kw = {"dtype": dtype}
        A = torch.empty(self.rank, self.in_features, **kw)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(device))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, **kw))
        nonzeros = int(density * self.out_features * self.in_features)
        support = torch.randperm(self.out_features * self.in_features, generator=generator)[:nonzeros].sort().values
        self.register_buffer("support", support.to(device))
        bound = 1.0 / math.sqrt(self.in_features)
        values = torch.empty(nonzeros, **kw).uniform_(-bound, bound, generator=generator)
        self.values = nn.Parameter(values.to(device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def sparse(self) -> torch.Tensor:
        """S as a dense out x in matrix (zero off the support)."""
        flat = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        return flat.scatter(0, self.support, self.values).reshape(self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A) + self.sparse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def ranks(self) -> int:
        return self.rank

    def stored_params(self) -> int:
        return self.rank * (self.out_features + self.in_features) + int(self.support.numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nonzeros={self.support.numel()}")
