"""The layers of ``dlrt`` (the method, its equations and choices: the docstring of ``dlrt``): ``DLRTLinear``
(W = U S V^T trained by the rank-adaptive integrator), ``DLRTConv2d`` (a kernel as the matrix of its flattened
filters), the K/L product ``_KLProduct`` and ``dlrt_layer``, a site's replacement. Imported when a run builds its
layers (torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rankbench.kinds.tensor_formats import conv_geometry
from rankbench.kinds.layers import clip_rank, tail_rank
from rankbench_plugins.trainers._integrator import IntegratorLayer, orth, svd

if TYPE_CHECKING:
    from rankbench_plugins.trainers._integrator_trainer import IntegratorParams


class _KLProduct(torch.autograd.Function):
    """y = x V S^T U^T whose backward gives x its true gradient and the K = U S and L = V S^T leaves the gradients
    of the K-form (x V K^T) and L-form (x L U^T): grad_K = dY^T (x V) = G V, grad_L = x^T (dY U) = G^T U."""

    @staticmethod
    def forward(ctx, x, U, S, V, K, L):
        ctx.save_for_backward(x, U, S, V)
        return ((x @ V) @ S.T) @ U.T

    @staticmethod
    def backward(ctx, dy):
        x, U, S, V = ctx.saved_tensors
        dyU = dy @ U
        grad_x = (dyU @ S) @ V.T if ctx.needs_input_grad[0] else None
        grad_K = dy.T @ (x @ V) if ctx.needs_input_grad[4] else None
        grad_L = x.T @ dyU if ctx.needs_input_grad[5] else None
        return grad_x, None, None, None, grad_K, grad_L


class DLRTLinear(IntegratorLayer):
    """W = U S V^T (+ bias) trained by the rank-adaptive integrator; U, S, V are buffers the integrator rewrites."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None,
                 rank_min: int = 2, rank_max: int | None = None):
        super().__init__()
        self.out_features, self.in_features = int(U.shape[0]), int(V.shape[0])
        self.register_buffer("U", U.detach().clone())
        self.register_buffer("S", S.detach().clone())
        self.register_buffer("V", V.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.rank_min = int(rank_min)
        self.rank_cap = default_cap(self.out_features, self.in_features, rank_max)
        self._kl: tuple[torch.Tensor, torch.Tensor] | None = None

    def ranks(self) -> int:
        return int(min(self.S.shape))

    def stored_params(self) -> int:
        return self.ranks() * (self.out_features + self.in_features)

    def to_dense(self) -> torch.Tensor:
        """U S V^T (tests and diagnostics only)."""
        return self.U @ self.S @ self.V.T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.ranks()}"

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self._kl is not None:
            return _KLProduct.apply(x, self.U, self.S, self.V, *self._kl)
        return ((x @ self.V) @ self.S.T) @ self.U.T

    # -- the integrator's stages ------------------------------------------------------------------------------------
    def begin_basis_step(self) -> None:
        K = (self.U @ self.S).requires_grad_(True)
        L = (self.V @ self.S.T).requires_grad_(True)
        self._kl = (K, L)

    def kl_gradients(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """grad_K, grad_L of the last K-step pass (None before one)."""
        return (None, None) if self._kl is None else (self._kl[0].grad, self._kl[1].grad)

    def augment(self, lr: float) -> None:
        K, L = self._kl
        self._kl = None
        U, S, V = self.U, self.S, self.V
        U_hat = orth(torch.cat([self.descend("K", K, lr), U], dim=1))
        V_hat = orth(torch.cat([self.descend("L", L, lr), V], dim=1))
        S_hat = (U_hat.T @ U) @ S @ (V.T @ V_hat)
        self.U, self.V = U_hat, V_hat
        self.S = S_hat.requires_grad_(True)

    def galerkin(self, lr: float) -> None:
        self.S = self.descend("S", self.S, lr)
        self._step_bias(lr)

    def truncate(self, tau: float) -> None:
        P, d, Qh = svd(self.S.detach())
        r = clip_rank(tail_rank(d, tau), self.rank_min, min(self.rank_cap, d.numel()))
        self.U = self.U @ P[:, :r]
        self.V = self.V @ Qh[:r].T
        self.S = torch.diag(d[:r])


class DLRTConv2d(DLRTLinear):
    """A Conv2d whose kernel, as the out x (in kh kw) matrix of its flattened filters, is U S V^T trained by the
    integrator; the forward applies it to the unfolded input patches (module docstring)."""

    def __init__(self, U, S, V, bias, kernel_size, stride=1, padding=0, dilation=1, rank_min: int = 2,
                 rank_max: int | None = None):
        super().__init__(U, S, V, bias, rank_min, rank_max)
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, in kh kw, L)
        y = self.product(patches.transpose(1, 2).reshape(-1, self.in_features))  # (B L, out)
        if self.bias is not None:
            y = y + self.bias
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return y.reshape(batch, out_h * out_w, self.out_features).transpose(1, 2).reshape(batch, -1, out_h, out_w)


def default_cap(out_features: int, in_features: int, rank_max: int | None) -> int:
    full = min(out_features, in_features)
    return max(1, min(full // 2 if rank_max is None else int(rank_max), full))


def dlrt_layer(linear: nn.Linear | nn.Conv2d, params: IntegratorParams, generator: torch.Generator) -> DLRTLinear:
    """The site's replacement at the starting rank (``init``: see the module docstring); a ``DLRTConv2d`` for a
    Conv2d (its kernel as the out x in kh kw matrix)."""
    conv = isinstance(linear, nn.Conv2d)
    if conv:
        conv_geometry(linear)  # refuses groups != 1 and non-numeric or non-zero padding
    W = linear.weight.detach().reshape(linear.weight.shape[0], -1)
    out_features, in_features = W.shape
    cap = default_cap(out_features, in_features, params.rank_max)
    r = cap if params.init_rank is None else min(int(params.init_rank), cap)
    if params.init == "dense":
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        U, S, V = U[:, :r], torch.diag(s[:r]), Vh[:r].T
    else:
        U = torch.linalg.qr(torch.randn(out_features, r, generator=generator, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(in_features, r, generator=generator, dtype=torch.float64))[0]
        s = torch.randn(2 * cap, generator=generator, dtype=torch.float64).abs().sort(descending=True).values
        S = torch.diag(s[:r])
    to = {"device": W.device, "dtype": W.dtype}
    if conv:
        return DLRTConv2d(U.to(**to), S.to(**to), V.to(**to), linear.bias, linear.kernel_size, linear.stride,
                          linear.padding, linear.dilation, params.rank_min, params.rank_max)
    return DLRTLinear(U.to(**to), S.to(**to), V.to(**to), linear.bias, params.rank_min, params.rank_max)
