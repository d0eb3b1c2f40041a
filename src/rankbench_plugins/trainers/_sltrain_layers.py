"""The layer of ``sltrain`` (the method, its equations and defaults: the docstring of ``sltrain``): ``SLTrainLinear``,
W = (alpha / r) B A + S with S on a fixed random support, and ``SparsePlusLowRankLinear``, the memory-efficient
autograd function of its forward, as the SLTrain reference code implements it (andyjm3/SLTrain,
``splora/splora_linear.py`` and the extension ``sparse-lora/sparse_linear.cpp``; the paper, Han et al. NeurIPS 2024,
credits its memory saving to this custom forward/backward -- the section wording was not checked against the paper
text here): the dense W is formed in the forward only to compute y and then freed; the backward re-forms it from the
saved factors and the sparse values and indices. Imported when a run builds its layers (torch).

Forward:   W = s B A (+)_Omega v,   y = x W^T + b            (s = alpha / r, (+)_Omega: add v at the flat indices Omega)
Saved:     x, B, A, v, Omega        (never W, never an out x in tensor)
Backward:  with G = dL/dy, X = x flattened to (N, in), dW = G^T X (transient, out x in):
           dL/dx = G W (W re-formed, freed before dW is built),  dL/dB = s dW A^T,  dL/dA = s B^T dW,
           dL/dv = dW[Omega] (a gather),  dL/db = sum_n G_n.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from rankbench.kinds.layers import RankAdaptiveLayer


def assemble_weight(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, support: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """W = scaling B A (+) S as a new out x in tensor, built in place (one out x in allocation, no autograd)."""
    W = B @ A
    W.mul_(scaling)
    # support: distinct flat indices into W; index_put_ with accumulate has a deterministic CUDA kernel
    W.view(-1).index_put_((support,), values.to(W.dtype), accumulate=True)
    return W


class SparsePlusLowRankLinear(torch.autograd.Function):
    """y = x (scaling B A (+)_support values)^T + bias; saves x, B, A, values, support (not W) and re-forms W in the
    backward. First-order only (``once_differentiable``)."""

    @staticmethod
    def forward(ctx, x, B, A, values, support, scaling, bias):
        W = assemble_weight(B, A, values, support, scaling)
        y = F.linear(x, W, bias)
        del W
        ctx.save_for_backward(x, B, A, values, support)
        ctx.scaling = float(scaling)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, B, A, values, support = ctx.saved_tensors
        need_x, need_B, need_A, need_values, _, _, need_bias = ctx.needs_input_grad
        G = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_B = grad_A = grad_values = grad_bias = None
        if need_x:
            W = assemble_weight(B, A, values, support, ctx.scaling)
            grad_x = (G @ W).view_as(x)
            del W  # freed before dW is formed: the backward holds at most one out x in tensor
        if need_B or need_A or need_values:
            dW = G.T @ x.reshape(-1, x.shape[-1])
            if need_B:
                grad_B = (dW @ A.T).mul_(ctx.scaling)
            if need_A:
                grad_A = (B.T @ dW).mul_(ctx.scaling)
            if need_values:
                grad_values = dW.view(-1).gather(0, support)
            del dW
        if need_bias and ctx.has_bias:
            grad_bias = G.sum(0)
        return grad_x, grad_B, grad_A, grad_values, None, None, grad_bias


class SLTrainLinear(RankAdaptiveLayer):
    """y = x ((alpha / r) B A + S)^T + bias. B (out x r) starts at zero, A (r x in) Kaiming-uniform (a = sqrt 5),
    S's values uniform in +-1/sqrt(in) on ``support`` (flat indices into the out x in weight, a buffer that never
    changes). ``forward`` is the memory-efficient ``SparsePlusLowRankLinear``; ``forward_dense`` the same function
    through autograd on the formed W (which autograd then keeps until the backward) -- the reference of the tests and
    of ``benchmarks/memory/sltrain_memory.py``."""

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
        return SparsePlusLowRankLinear.apply(x, self.B, self.A, self.values, self.support, self.scaling, self.bias)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The naive forward: F.linear on the W of ``dense_weight`` (autograd saves W for the backward)."""
        return F.linear(x, self.dense_weight(), self.bias)

    def ranks(self) -> int:
        return self.rank

    def stored_params(self) -> int:
        return self.rank * (self.out_features + self.in_features) + int(self.support.numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nonzeros={self.support.numel()}")
