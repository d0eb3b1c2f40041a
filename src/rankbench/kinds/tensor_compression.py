"""Tensor-format factorizations in the ``compression`` problem kind: a Linear's weight W (out x in) is reshaped to a
tensor and replaced by a CP, Tucker, tensor-train or TT-matrix layer whose ranks a selector chose. Formats with
``conv_kernels`` (``cp``, ``tucker``) also factorise a Conv2d site's 4-mode kernel (out x in x kh x kw) into a
sequence of smaller convolutions (``tensor_formats.CPConv2d`` / ``TuckerConv2d``).

The formats, their fitting and their forwards are in ``rankbench.kinds.tensor_formats`` (the
reshaping convention is documented there: ``out_dims`` = ``factor_dims(out, order_out)``, ``in_dims`` likewise).
What a selector sees of a site (``TensorFactorization.site``):

* ``cp`` -- one rank R, read like a matrix rank: ``singular_values`` of W itself, ``max_rank`` the largest R whose
  R (sum dims + 1) parameters do not exceed the dense weight's, ``params_at_rank(R)`` exact. (A CP rank is not the
  rank of any unfolding; the matrix spectrum is the heuristic every spectral selector then applies.)
* ``tucker`` -- one rank per tensor mode: the spectra of the mode-k unfoldings (Kim et al. 2016 choose Tucker-2
  ranks by EVBMF on exactly these), capped at the mode sizes;
* ``tt`` / ``ttm`` -- one rank per internal bond: the spectra of the sequential unfoldings T_<k> (for ``ttm`` of
  the tensor with output and input modes paired), whose discarded tails bound the TT-SVD error (Oseledets 2011,
  Thm 2.2), capped at the unfolding ranks; infeasible combinations are clipped (``clip_tt_ranks``).
* a conv kernel under ``cp`` -- one rank R, from the singular values of the kernel as an out x (in kh kw) matrix,
  capped where R (out + in + kh + kw) reaches the kernel's size;
* a conv kernel under ``tucker`` -- Tucker-2 (Kim et al. 2016): two slots, the output- and input-channel
  unfoldings' spectra, capped at the channel counts; the spatial modes stay full.

Every site's ``params_at_ranks`` prices a rank tuple exactly (at the clipped ranks the layer will have), so budgeted
selectors meet ``param_ratio`` on the real cost. Spectra are computed once per site and factorization, fitted layers
once per (site, ranks); both are memoised with the calibration data of the task configuration. Selectors that need
an SVD-form ``decomposition`` (sensitivity, adalora, sublora, welore's normalised spectra of matrices) skip these
factorizations.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar, TYPE_CHECKING

import numpy as np
from pydantic import Field

from rankbench.api import COMPRESSION, TRAINING, Factorization, PluginParams, RankProblem, Site

if TYPE_CHECKING:
    import torch
    from torch import nn
    from rankbench.kinds import tensor_formats as tf

_TENSOR = "compression.tensor"  # per-calibration-slot memo: {"sites": {...}, "layers": {...}}


class TensorFactorization(Factorization):
    """Base of ``cp``, ``tucker``, ``tt``, ``ttm``: subclasses give the rank slots, the cost and the fit."""

    # training: the format a rank-adaptive method trains in (``rankbench.kinds.training``)
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION, TRAINING})
    # whether the format also factorises Conv2d kernels (4-D shapes in ``slots`` / ``params_at_ranks`` /
    # ``feasible``, and ``fit_conv``)
    conv_kernels: ClassVar[bool] = False

    class Params(PluginParams):
        order_out: int = Field(2, ge=1, le=6, description="tensor modes the output dimension is split into")
        order_in: int = Field(2, ge=1, le=6, description="tensor modes the input dimension is split into")

    def dims(self, shape: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        from rankbench.kinds import tensor_formats as tf
        out_features, in_features = shape
        return tf.factor_dims(out_features, self.params.order_out), tf.factor_dims(in_features, self.params.order_in)

    # -- what a format provides -------------------------------------------------------------------------------------
    @abstractmethod
    def slots(self, weight: torch.Tensor) -> tuple[list[np.ndarray], list[tuple[int, int]], list[int]]:
        """For every rank slot of the format: its spectrum, the (rows, cols) of the matrix behind it, its cap."""

    @abstractmethod
    def params_at_ranks(self, shape: tuple[int, int], ranks: tuple[int, ...]) -> int:
        """Parameters stored by a ``shape`` weight in this format at the given slot ranks."""

    @abstractmethod
    def fit(self, weight: torch.Tensor, bias: torch.Tensor | None, ranks: tuple[int, ...]) -> tf.TensorLinear:
        """The weight (and bias) fitted in this format at the given slot ranks, as a layer."""

    def feasible(self, shape: tuple[int, int], ranks: tuple[int, ...]) -> tuple[int, ...]:
        """The ranks the fitted layer will really have (clipped to the format's feasible set)."""
        return tuple(int(r) for r in ranks)

    def fit_conv(self, conv: nn.Conv2d, ranks: tuple[int, ...]) -> nn.Module:
        """``conv``'s kernel fitted in this format at the given slot ranks, as a factorised convolution (formats with
        ``conv_kernels``)."""
        raise TypeError(f"{self.name} does not factorise convolution kernels")

    def fit_site(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Module:
        """The site's replacement: ``fit_conv`` for a Conv2d, ``fit`` (in float64) for a Linear."""
        from torch import nn
        import torch
        if isinstance(module, nn.Conv2d):
            return self.fit_conv(module, ranks)
        bias = None if module.bias is None else module.bias.detach()
        return self.fit(module.weight.detach().to(torch.float64), bias, ranks)

    # -- the selector's view of a site ---------------------------------------------------------------------------
    def site(self, name: str, weight: torch.Tensor) -> Site:
        import torch
        shape = tuple(int(d) for d in weight.shape)
        if len(shape) != 2 and not self.conv_kernels:
            raise TypeError(f"{self.name} factorises matrices only; site {name!r} has a weight of shape {shape}")
        spectra, dims, caps = self.slots(weight.detach().to(torch.float64))
        tensor_shape = (*self.dims(shape)[0], *self.dims(shape)[1]) if len(shape) == 2 else shape  # conv: the kernel
        return Site(
            name=name,
            shape=tensor_shape if len(spectra) > 1 else dims[0],
            mode_singular_values=spectra if len(spectra) > 1 else None,
            singular_values=spectra[0] if len(spectra) == 1 else None,
            rank_dims=dims if len(spectra) > 1 else None,
            rank_caps=caps if len(spectra) > 1 else None,
            params_at_ranks=lambda ranks: self.params_at_ranks(shape, tuple(ranks)),
            params_at_rank=lambda k: self.params_at_ranks(shape, tuple(min(int(k), c) for c in caps)),
            dense_params=math.prod(shape),
            max_rank=caps[0] if len(spectra) == 1 else max(caps),
        )


def tensor_memo(task, ctx) -> dict:
    slot = task.calibration_memo(ctx)  # lives and dies with the task configuration's model and calibration data
    return slot.setdefault(_TENSOR, {"sites": {}, "layers": {}})


def tensor_sites(task, ctx, factorization: TensorFactorization) -> list[Site]:
    """The selector's view of every site, computed once per factorization (and its parameters)."""
    memo = tensor_memo(task, ctx)["sites"]
    out = []
    for name, linear in task.sites(ctx).items():
        key = (*factorization.identity, name)
        if key not in memo:
            memo[key] = factorization.site(name, linear.weight)
        out.append(memo[key])
    return out


def run_tensor_compression(task, ctx, selector, factorization: TensorFactorization) -> None:
    """One compression cell with a tensor format: select per-slot ranks, fit (memoised), swap, evaluate, restore."""
    model = task.model(ctx)
    sites = task.sites(ctx)
    with ctx.phase("decompose"):
        views = tensor_sites(task, ctx, factorization)
    problem = RankProblem(sites=views, budget=ctx.budget, budget_kind=ctx.budget_kind, seed=ctx.seed,
                          device=ctx.device)
    with ctx.phase("select"):
        ranks = selector.select(problem)
    layers, chosen = {}, {}
    memo = tensor_memo(task, ctx)["layers"]
    with ctx.phase("fit"):
        for view in views:
            if view.name not in ranks:
                raise ValueError(f"the selector gave no rank for site {view.name!r}")
            answer = ranks[view.name]
            if isinstance(answer, (tuple, list)):
                wanted = tuple(int(r) for r in answer)
            else:  # one number for a site with several slots: that rank in every slot (capped)
                wanted = tuple(min(int(answer), cap) for cap in (view.rank_caps or [int(answer)]))
            linear = sites[view.name]
            shape = tuple(linear.weight.shape)
            feasible = factorization.feasible(shape, tuple(max(1, r) for r in wanted))
            key = (*factorization.identity, view.name, feasible)
            if key not in memo:
                memo[key] = factorization.fit_site(linear, feasible)
            layers[view.name] = memo[key].to(device=linear.weight.device, dtype=linear.weight.dtype)
            chosen[view.name] = feasible
    dense = kept = 0
    try:
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        for name, linear in sites.items():
            shape = tuple(linear.weight.shape)
            params = factorization.params_at_ranks(shape, chosen[name])
            dense += math.prod(shape)
            kept += params
            rank = chosen[name]
            ctx.ranks(name, rank[0] if len(rank) == 1 else rank, params)
        with ctx.phase("evaluate"):
            task.evaluate(ctx, model)
    finally:
        for name, linear in sites.items():
            model.set_submodule(name, linear)
    ctx.record_size(kept, dense)

