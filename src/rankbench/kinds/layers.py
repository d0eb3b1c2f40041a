"""The torch modules of the problem kinds: what replaces or wraps a site inside a model. Each kind module re-exports
its own (``rankbench.kinds.compression.LowRankLinear``, ...); they live here so that importing a kind module, and
with it every plugin, does not import torch (a plugin's registration must stay light; ``bench plugins`` and ``bench
check`` never build a model).

* ``LowRankLinear`` and ``SigmaLinear``: the compression kind's replacement of a Linear at rank k, and the same with
  a differentiable vector of singular values (``CompressionStatistics.sigma_loss``);
* ``SVDAdapter``: the adaptation kind's frozen Linear plus an SVD-form low-rank update ``scaling * P diag(E * mask) Q``;
* ``RankAdaptiveLayer``: the base of a rank-adaptive trainer's site replacement (training kind);
* ``tail_rank`` and ``clip_rank``: the truncation rule of the dynamical low-rank integrators (DLRT and TDLRT in the
  training kind, GeoLoRA in the adaptation kind).
"""

from __future__ import annotations

import abc
import torch
from torch import nn
from torch.nn.utils import skip_init


class LowRankLinear(nn.Module):
    """y = A (B x) + bias, as two Linears (in -> rank -> out); stores rank * (in + out) weights."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, rank = A.shape
        in_features = B.shape[1]
        if B.shape[0] != rank:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        kw = {"device": A.device, "dtype": A.dtype}
        # skip_init: no random initialisation of weights that are overwritten at once.
        self.down = skip_init(nn.Linear, in_features, rank, bias=False, **kw)
        self.up = skip_init(nn.Linear, rank, out_features, bias=bias is not None, **kw)
        with torch.no_grad():
            self.down.weight.copy_(B)
            self.up.weight.copy_(A)
            if bias is not None:
                self.up.bias.copy_(bias)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class ReplayedBlock(nn.Module):
    """Stands in for one of a model's sequential blocks, whatever it is called with: returns ``output()`` -- the
    block's recorded output (``compression.PrefixReplay``), computed by the dense block on the same input earlier."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output()


class SigmaLinear(nn.Module):
    """A Linear whose weight is left[:, :k] diag(sigma) right[:k] with ``sigma`` a (differentiable) input."""

    def __init__(self, decomposition, sigma: torch.Tensor, dense: nn.Linear):
        """``decomposition``: the site's ``compression.Decomposition`` (that module imports this one)."""
        super().__init__()
        if sigma.ndim != 1 or not 1 <= sigma.shape[0] <= decomposition.rank:
            raise ValueError(
                f"sigma must be a vector of length 1..{decomposition.rank}, got shape {tuple(sigma.shape)}"
            )
        k = sigma.shape[0]
        weight = dense.weight
        self.left = decomposition.left[:, :k].to(device=weight.device, dtype=weight.dtype)
        self.right = decomposition.right[:k].to(device=weight.device, dtype=weight.dtype)
        self.sigma = sigma
        self.bias = dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma.to(device=x.device, dtype=x.dtype)
        y = ((x @ self.right.T) * sigma) @ self.left.T
        return y if self.bias is None else y + self.bias


class SVDAdapter(nn.Module):
    """A frozen Linear plus an SVD-form low-rank update ``scaling * P diag(E * mask) Q`` (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, init_std: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = base.weight.shape
        rank = max(0, min(int(rank), out_features, in_features))
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        dtype, device = base.weight.dtype, base.weight.device
        self.P = nn.Parameter(torch.randn(out_features, rank, generator=generator, dtype=dtype).to(device) * init_std)
        self.E = nn.Parameter(torch.zeros(rank, dtype=dtype, device=device))
        self.Q = nn.Parameter(torch.randn(rank, in_features, generator=generator, dtype=dtype).to(device) * init_std)
        self.register_buffer("mask", torch.ones(rank, dtype=dtype, device=device))
        self.init_rank = rank
        self.scaling = float(alpha) / rank if rank else 0.0
        self.sigma_override: torch.Tensor | None = None  # E replaced by a differentiable input (derivatives in E)

    @property
    def rank(self) -> int:
        return int(self.mask.sum().item())

    def params_at_rank(self, k: int) -> int:
        out_features, in_features = self.base.weight.shape
        return int(k) * (out_features + in_features + 1)

    def effective_e(self) -> torch.Tensor:
        e = self.E if self.sigma_override is None else self.sigma_override
        return e * self.mask

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.P * self.effective_e()) @ self.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.init_rank == 0:
            return y
        return y + self.scaling * ((x @ self.Q.T) * self.effective_e()) @ self.P.T

    def orthogonality(self) -> torch.Tensor:
        """||P^T P - I||_F + ||Q Q^T - I||_F (AdaLoRA's regulariser for this adapter)."""
        eye = torch.eye(self.init_rank, dtype=self.P.dtype, device=self.P.device)
        return torch.linalg.norm(self.P.T @ self.P - eye) + torch.linalg.norm(self.Q @ self.Q.T - eye)

    @torch.no_grad()
    def truncate(self, k: int) -> None:
        """Keep the leading k singular triplets of the current update, exactly re-parameterised in SVD form."""
        k = max(0, min(int(k), self.init_rank))
        U, s, Vh = torch.linalg.svd(self.delta_weight().to(torch.float64), full_matrices=False)
        rank = self.init_rank
        P = torch.zeros_like(self.P, dtype=torch.float64)
        Q = torch.zeros_like(self.Q, dtype=torch.float64)
        E = torch.zeros(rank, dtype=torch.float64, device=self.E.device)
        P[:, :k], Q[:k], E[:k] = U[:, :k], Vh[:k], s[:k] / self.scaling
        self.P.copy_(P)
        self.Q.copy_(Q)
        self.E.copy_(E)
        self.mask.zero_()
        self.mask[:k] = 1.0


class RankAdaptiveLayer(nn.Module, abc.ABC):
    """A site's replacement during rank-adaptive training. ``ranks()`` is an int (matrix formats) or a tuple of
    slot ranks (tensor formats); ``stored_params()`` counts what inference needs at the current ranks (bias
    excluded, as everywhere in rankbench)."""

    @abc.abstractmethod
    def ranks(self) -> int | tuple[int, ...]:
        """The layer's current rank (matrix formats) or slot ranks (tensor formats)."""

    @abc.abstractmethod
    def stored_params(self) -> int:
        """Parameters inference needs at the current ranks (bias excluded)."""


def tail_rank(d: torch.Tensor, tau: float) -> int:
    """Smallest j with ||d[j:]||_2 < tau * ||d||_2 (d: singular values, descending); len(d) when none is (tau = 0,
    or d = 0)."""
    d = d.detach().double().cpu()
    tails = torch.cat([d.square().flip(0).cumsum(0).flip(0), d.new_zeros(1)]).sqrt()  # tails[j] = ||d[j:]||
    below = torch.nonzero(tails < tau * tails[0]).flatten()
    return int(below[0]) if below.numel() else int(d.numel())


def clip_rank(rank: int, rank_min: int, cap: int) -> int:
    """``rank`` clipped to [min(rank_min, cap), cap] (rank_min wins over the rule, the cap over rank_min)."""
    return max(min(rank, cap), min(rank_min, cap))
