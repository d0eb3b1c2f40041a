"""The layers of ``tdlrt`` (the method, its equations and our reading of the paper: the docstring of ``tdlrt``):
``TuckerDLRTLinear`` (a reshaped Linear weight T = C x_i U_i trained by the rank-adaptive integrator),
``TuckerDLRTConv2d`` (a 4-mode conv kernel), the K-form product ``_TuckerKL``, the Tucker contraction
``tucker_apply``, the rank caps and starts (``mode_caps``, ``start_ranks``), ``hosvd`` and ``tdlrt_layer``, a site's
replacement. Imported when a run builds its layers (torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rankbench.kinds.tensor_formats import clip_tucker_ranks, conv_geometry, mode_dot, params_tucker, unfold
from rankbench.kinds.layers import clip_rank, tail_rank
from rankbench_plugins.trainers._integrator import IntegratorLayer, orth, svd

if TYPE_CHECKING:
    from rankbench_plugins.trainers._integrator_trainer import IntegratorParams


def tucker_apply(x: torch.Tensor, core: torch.Tensor, factors: Sequence[torch.Tensor], out_dims, in_dims):
    """x (n, in) -> x W^T (n, out) for W = (core x_i factors[i]) reshaped: project the input modes (i_k -> r_k),
    contract the core as one GEMM, expand the output modes (r_k -> o_k)."""
    p, n = len(out_dims), x.shape[0]
    ranks = core.shape
    t = x.reshape(n, *in_dims)
    for k, U in enumerate(factors[p:]):
        t = mode_dot(t, U, 1 + k)
    r_out, r_in = math.prod(ranks[:p]), math.prod(ranks[p:])
    t = (t.reshape(n, r_in) @ core.reshape(r_out, r_in).T).reshape(n, *ranks[:p])
    for k, U in enumerate(factors[:p]):
        t = mode_dot(t, U.T, 1 + k)
    return t.reshape(n, math.prod(out_dims))


def _project(t: torch.Tensor, factors: Sequence[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    """Contract axis 1 + k of the batched tensor t with factors[k] (n_k -> r_k) for every k but ``skip``."""
    for k, U in enumerate(factors):
        if k != skip:
            t = mode_dot(t, U, 1 + k)
    return t


class _TuckerKL(torch.autograd.Function):
    """y = x W^T for the Tucker weight; the backward gives x its true gradient and each K_i leaf the gradient of the
    K_i-form T = fold_i(Q_i^T) x_i K_i x_{j != i} U_j, i.e. Mat_i(G x_{j != i} U_j^T) Q_i, computed from x and dY
    without forming G: the per-sample outer products of dY and x, each projected on all modes but i, summed."""

    @staticmethod
    def forward(ctx, x, out_dims, in_dims, core, *tensors):
        d = len(out_dims) + len(in_dims)
        factors, Qs = tensors[:d], tensors[d:2 * d]
        ctx.dims = (tuple(out_dims), tuple(in_dims))
        ctx.save_for_backward(x, core, *factors, *Qs)
        return tucker_apply(x, core, factors, out_dims, in_dims)

    @staticmethod
    def backward(ctx, dy):
        out_dims, in_dims = ctx.dims
        p, d = len(out_dims), len(out_dims) + len(in_dims)
        x, core, *rest = ctx.saved_tensors
        factors, Qs = rest[:d], rest[d:]
        n = x.shape[0]
        Gt, Xt = dy.reshape(n, *out_dims), x.reshape(n, *in_dims)
        Gp, Xp = _project(Gt, factors[:p]), _project(Xt, factors[p:])  # (n, r_out...), (n, r_in...)
        grad_x = None
        if ctx.needs_input_grad[0]:
            r_out, r_in = math.prod(core.shape[:p]), math.prod(core.shape[p:])
            t = (Gp.reshape(n, r_out) @ core.reshape(r_out, r_in)).reshape(n, *core.shape[p:])
            for k, U in enumerate(factors[p:]):
                t = mode_dot(t, U.T, 1 + k)
            grad_x = t.reshape(n, -1)
        grads_K = []
        for i in range(d):
            if not ctx.needs_input_grad[4 + 2 * d + i]:
                grads_K.append(None)
                continue
            if i < p:
                left, right = _project(Gt, factors[:p], skip=i), Xp
            else:
                left, right = Gp, _project(Xt, factors[p:], skip=i - p)
            M = (left.reshape(n, -1).T @ right.reshape(n, -1)).reshape(*left.shape[1:], *right.shape[1:])
            grads_K.append(unfold(M, i) @ Qs[i])
        return (grad_x, None, None, None, *([None] * (2 * d)), *grads_K)


class TuckerDLRTLinear(IntegratorLayer):
    """T = C x_i U_i (+ bias) trained by the rank-adaptive integrator; the core and factors are buffers."""

    def __init__(self, core: torch.Tensor, factors: Sequence[torch.Tensor], out_dims, in_dims,
                 bias: torch.Tensor | None, rank_min: int = 2, rank_max: int | None = None,
                 max_rank_fraction: float = 1.0):
        super().__init__()
        self.out_dims, self.in_dims = tuple(int(n) for n in out_dims), tuple(int(n) for n in in_dims)
        self.dims = (*self.out_dims, *self.in_dims)
        self.out_features, self.in_features = math.prod(self.out_dims), math.prod(self.in_dims)
        if core.ndim != len(self.dims) or any(tuple(U.shape) != (n, r) for U, n, r in
                                              zip(factors, self.dims, core.shape)):
            raise ValueError(f"Tucker factors {[tuple(U.shape) for U in factors]} do not match dims {self.dims} "
                             f"and core {tuple(core.shape)}")
        self.register_buffer("core", core.detach().clone())
        for i, U in enumerate(factors):
            self.register_buffer(f"U{i}", U.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.rank_min = int(rank_min)
        self.rank_caps = mode_caps(self.dims, rank_max, max_rank_fraction)
        self._kl: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"U{i}") for i in range(len(self.dims))]

    def _set_factors(self, factors: Sequence[torch.Tensor]) -> None:
        for i, U in enumerate(factors):
            setattr(self, f"U{i}", U)

    def ranks(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.core.shape)

    def stored_params(self) -> int:
        return params_tucker(self.out_dims, self.in_dims, self.ranks())

    def to_dense(self) -> torch.Tensor:
        """The out x in weight (tests and diagnostics only)."""
        t = self.core
        for k, U in enumerate(self.factors):
            t = mode_dot(t, U.T, k)
        return t.reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, out_dims={self.out_dims}, "
                f"in_dims={self.in_dims}, ranks={self.ranks()}")

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self._kl is not None:
            Qs, Ks = self._kl
            return _TuckerKL.apply(x, self.out_dims, self.in_dims, self.core, *self.factors, *Qs, *Ks)
        return tucker_apply(x, self.core, self.factors, self.out_dims, self.in_dims)

    # -- the integrator's stages ------------------------------------------------------------------------------------
    def begin_basis_step(self) -> None:
        Qs, Ks = [], []
        for i, U in enumerate(self.factors):
            Q, R = torch.linalg.qr(unfold(self.core, i).T, mode="reduced")  # Mat_i(C)^T = Q_i R_i
            Qs.append(Q)
            Ks.append((U @ R.T).requires_grad_(True))
        self._kl = (Qs, Ks)

    def k_gradients(self) -> list[torch.Tensor | None]:
        """grad_K_i of the last K-step pass (Nones before one)."""
        return [None] * len(self.dims) if self._kl is None else [K.grad for K in self._kl[1]]

    def k_forms(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """(Q_i, K_i) of the pending K-step pass (tests)."""
        return self._kl

    def augment(self, lr: float) -> None:
        _, Ks = self._kl
        self._kl = None
        core, new = self.core, []
        for i, (U, K) in enumerate(zip(self.factors, Ks)):
            U_aug = orth(torch.cat([self.descend(f"K{i}", K, lr), U], dim=1))
            core = mode_dot(core, U.T @ U_aug, i)  # C x_i (U~_i^T U_i)
            new.append(U_aug)
        self._set_factors(new)
        self.core = core.requires_grad_(True)

    def galerkin(self, lr: float) -> None:
        self.core = self.descend("core", self.core, lr)
        self._step_bias(lr)

    def truncate(self, tau: float) -> None:
        core = self.core.detach()
        Ps, ranks = [], []
        for i, cap in enumerate(self.rank_caps):
            P, s, _ = svd(unfold(core, i))
            Ps.append(P)
            ranks.append(clip_rank(tail_rank(s, tau), self.rank_min, min(cap, s.numel())))
        ranks = clip_tucker_ranks(self.dims, ranks)
        new = []
        for i, (U, P, r) in enumerate(zip(self.factors, Ps, ranks)):
            core = mode_dot(core, P[:, :r], i)  # C^ x_i P_i[:, :r_i]^T
            new.append(U @ P[:, :r])
        self._set_factors(new)
        self.core = core


class TuckerDLRTConv2d(TuckerDLRTLinear):
    """A Conv2d whose kernel (O, I, kh, kw) = C x_i U_i is trained by the rank-adaptive integrator; the forward
    reconstructs the kernel and convolves (module docstring)."""

    def __init__(self, core: torch.Tensor, factors: Sequence[torch.Tensor], bias: torch.Tensor | None,
                 stride=1, padding=0, dilation=1, rank_min: int = 2, rank_max: int | None = None,
                 max_rank_fraction: float = 1.0):
        if len(factors) != 4:
            raise ValueError(f"a conv kernel has 4 modes, got {len(factors)} factors")
        out_channels, *rest = (int(U.shape[0]) for U in factors)
        super().__init__(core, factors, (out_channels,), tuple(rest), bias, rank_min, rank_max, max_rank_fraction)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self._kernel_leaf: torch.Tensor | None = None

    def kernel(self) -> torch.Tensor:
        """The (O, I, kh, kw) kernel, differentiable in the core and factors."""
        t = self.core
        for k, U in enumerate(self.factors):
            t = mode_dot(t, U.T, k)
        return t

    def extra_repr(self) -> str:
        return (f"kernel={self.dims}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"ranks={self.ranks()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kl is not None:  # the K-step pass: dL/dK on a kernel leaf, the K_i gradients formed in augment
            weight = self._kernel_leaf = self.kernel().detach().requires_grad_(True)
        else:
            weight = self.kernel()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a convolution site has no row product; call the layer")

    def _fill_k_gradients(self) -> None:
        """grad_K_i = Mat_i(G x_{j != i} U_j^T) Q_i from the kernel leaf's gradient G (once per K-step pass; left
        None when the pass did not reach this layer)."""
        if self._kl is None or self._kernel_leaf is None:
            return
        G, self._kernel_leaf = self._kernel_leaf.grad, None
        if G is None:
            return
        Qs, Ks = self._kl
        for i, (Q, K) in enumerate(zip(Qs, Ks)):
            K.grad = unfold(_project(G[None], self.factors, skip=i)[0], i) @ Q

    def k_gradients(self) -> list[torch.Tensor | None]:
        self._fill_k_gradients()
        return super().k_gradients()

    def augment(self, lr: float) -> None:
        self._fill_k_gradients()
        super().augment(lr)


def mode_caps(dims: Sequence[int], rank_max: int | None, max_rank_fraction: float = 1.0) -> tuple[int, ...]:
    """Per-mode rank caps: min(n_i, max(1, floor(max_rank_fraction n_i)), rank_max) (rank_max None: no bound)."""
    caps = []
    for n in dims:
        cap = min(n, max(1, math.floor(max_rank_fraction * n + 1e-9)))
        caps.append(max(1, cap if rank_max is None else min(cap, int(rank_max))))
    return tuple(caps)


def start_ranks(dims: Sequence[int], caps: Sequence[int], init_rank: int | None) -> tuple[int, ...]:
    """The starting ranks: init_rank, or half each mode size when None (the pre-version-2 cap), within the caps and
    Tucker-feasible."""
    ranks = [max(1, n // 2) if init_rank is None else int(init_rank) for n in dims]
    return clip_tucker_ranks(dims, [min(r, c) for r, c in zip(ranks, caps)])


def hosvd(T: torch.Tensor, ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated HOSVD: U_i = leading r_i left singular vectors of Mat_i(T), C = T x_i U_i^T."""
    factors = [torch.linalg.svd(unfold(T, i), full_matrices=False)[0][:, :r] for i, r in enumerate(ranks)]
    core = T
    for i, U in enumerate(factors):
        core = mode_dot(core, U, i)
    return core, factors


def tdlrt_layer(linear: nn.Linear | nn.Conv2d, factorization, params: IntegratorParams,
                generator: torch.Generator) -> TuckerDLRTLinear:
    """The site's replacement at the starting ranks (``init``: see the module docstring): a ``TuckerDLRTConv2d``
    over the kernel's own 4 modes for a Conv2d, a ``TuckerDLRTLinear`` over the factorization's reshaping else."""
    W = linear.weight.detach()
    conv = isinstance(linear, nn.Conv2d)
    if conv:
        conv_geometry(linear)  # refuses groups != 1 and non-numeric or non-zero padding
        out_dims, in_dims = tuple(W.shape[:1]), tuple(W.shape[1:])
    else:
        out_dims, in_dims = factorization.dims(tuple(W.shape))
    dims = (*out_dims, *in_dims)
    ranks = start_ranks(dims, mode_caps(dims, params.rank_max, params.max_rank_fraction), params.init_rank)
    if params.init == "dense":
        core, factors = hosvd(W.double().reshape(*dims), ranks)
    else:
        factors = [torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
                   for n, r in zip(dims, ranks)]
        bound = 1.0 / math.sqrt(math.prod(ranks[1:]))
        core = (2 * torch.rand(*ranks, generator=generator, dtype=torch.float64) - 1) * bound
    to = {"device": W.device, "dtype": W.dtype}
    if conv:
        return TuckerDLRTConv2d(core.to(**to), [U.to(**to) for U in factors], linear.bias, linear.stride,
                                linear.padding, linear.dilation, params.rank_min, params.rank_max,
                                params.max_rank_fraction)
    return TuckerDLRTLinear(core.to(**to), [U.to(**to) for U in factors], out_dims, in_dims, linear.bias,
                            params.rank_min, params.rank_max, params.max_rank_fraction)
