"""The layer of ``maestro`` (the method, its equations and defaults: the docstring of ``maestro``):
``MaestroLinear``, W = U V^T with ordered (prefix) rank truncation, its hierarchical group lasso and importances.
Imported when a run builds its layers (torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankbench.kinds.layers import RankAdaptiveLayer


class MaestroLinear(RankAdaptiveLayer):
    """y = x V[:, :b] U[:, :b]^T + bias with U (out x d), V (in x d), d = min(out, in). b is ``active_rank`` while
    the trainer samples this layer, else ``kept`` (the components progressive shrinking has left)."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = int(U.shape[0]), int(V.shape[0])
        self.U = nn.Parameter(U.detach().clone())
        self.V = nn.Parameter(V.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.kept = int(U.shape[1])
        self.active_rank: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MaestroLinear:
        """The site's weight W = P diag(s) Q^T as U = P sqrt(s), V = Q sqrt(s) (full rank d)."""
        P, s, Qh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        root = s.sqrt()
        return cls(P * root, Qh.T * root, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.kept if self.active_rank is None else self.active_rank
        if b == 0:
            out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
            return out if self.bias is None else out + self.bias
        return F.linear(F.linear(x, self.V[:, :b].T), self.U[:, :b], self.bias)

    def tail_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||V[:, k:kept]||_F, ||U[:, k:kept]||_F) for k = 0..kept-1: the hierarchical groups' norms over the kept
        components (the ones shrunk away are out of the layer, as in the reference's pruned layer)."""
        def tails(factor: torch.Tensor) -> torch.Tensor:
            return factor[:, :self.kept].pow(2).sum(0).flip(0).cumsum(0).flip(0).sqrt()

        return tails(self.V), tails(self.U)

    def group_lasso(self) -> torch.Tensor:
        """sum_k ||V[:, k:kept]||_F + ||U[:, k:kept]||_F over the kept components."""
        v_tail, u_tail = self.tail_norms()
        return (v_tail + u_tail).sum()

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """||V[:, k:kept]||_F ||U[:, k:kept]||_F per kept component k (non-increasing in k)."""
        v_tail, u_tail = self.tail_norms()
        return v_tail * u_tail

    @torch.no_grad()
    def shrink(self, threshold: float) -> None:
        """Drop the kept components whose importance is below ``threshold`` (the kept ones stay a prefix, importances
        being non-increasing); dropped components never return."""
        self.kept = int((self.importance() >= threshold).sum())

    def to_dense(self) -> torch.Tensor:
        return self.U[:, :self.kept] @ self.V[:, :self.kept].T

    def ranks(self) -> int:
        return self.kept

    def stored_params(self) -> int:
        return self.kept * (self.out_features + self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.kept}"
