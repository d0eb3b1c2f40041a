"""Tensor-format factorizations of a Linear layer's weight: CP, Tucker, tensor train (TT) and TT-matrix (TTM).

A helper module (no plugin is registered here): it fits a weight ``W`` (out x in) in one of four tensor formats and
returns an ``nn.Module`` (``TensorLinear``) whose forward takes, per layer shape and batch size, the fastest (timed
once per process) or, in deterministic mode, the cheapest by a FLOP model of reconstruct-then-GEMM (the dense weight
cached while no gradient is needed), the format's hand-written contraction and an opt_einsum-planned contraction (see
``TensorLinear``). All fitting runs in float64 on W's device; the returned layer keeps W's dtype and device.

Reshaping convention
--------------------
``factor_dims(n, order)`` splits n into ``order`` integer factors whose product is exactly n, as balanced as a
simple deterministic rule allows: take the prime factorisation of n, hand the primes out largest first, each to the
currently smallest factor (the first one on ties), and sort the result descending. 768 -> (12, 8, 8) for order 3,
3072 -> (64, 48) for order 2; a prime n (or n = 1) leaves factors equal to 1, which is allowed.

``cp``, ``tucker``, ``tt``: with ``out_dims = (o_1, ..., o_p)`` (prod = out) and ``in_dims = (i_1, ..., i_q)``
(prod = in; by default p = q = 2 via ``factor_dims``), the weight is viewed as the (p + q)-way tensor

    T[o_1, ..., o_p, i_1, ..., i_q] = W[row, col],   row = row-major index of (o_1..o_p), col = that of (i_1..i_q)

i.e. ``T = W.reshape(*out_dims, *in_dims)``. Tensor modes are numbered 0..p+q-1, output modes first; factor lists
and rank tuples follow that order.

``ttm``: the TT-matrix format pairs each output mode with one input mode (p = q = d, usually 2 or 3):

    W[(o_1..o_d), (i_1..i_d)] = G_1[o_1, i_1] G_2[o_2, i_2] ... G_d[o_d, i_d],

each ``G_k[o_k, i_k]`` an r_{k-1} x r_k matrix (r_0 = r_d = 1), i.e. cores of shape (r_{k-1}, o_k, i_k, r_k). It is
the TT format of T with modes permuted to (o_1, i_1, o_2, i_2, ...) and each pair merged into one mode of size o_k i_k.

Formats, papers, equations
--------------------------
* CP / CANDECOMP-PARAFAC (Hitchcock 1927, "The expression of a tensor or a polyadic as a sum of products"; Kolda &
  Bader 2009, "Tensor Decompositions and Applications", SIAM Review 51(3), §3): T ~ sum_r lambda_r a^(1)_r o ... o
  a^(N)_r with factor matrices A_k (dim_k x R) of unit-norm columns and weights lambda (R). Fitted by CP-ALS (Kolda &
  Bader Fig. 3.3): for each mode n, A_n <- X_(n) (A_N (.) ... (.) A_1, skipping n) V^+ with V the Hadamard product of
  the A_j^T A_j (j != n) (Kolda & Bader unfold column-major; with this module's row-major unfoldings the Khatri-Rao
  product runs A_1 (.) ... (.) A_N instead), then columns normalised into lambda. The MTTKRP X_(n) (...) is computed
  through a two-level split of the modes (one GEMM of |T| R per half per sweep, shared by the modes of that half).
  Initialised with the leading R left singular vectors of each unfolding X_(n) (deterministic; columns beyond
  rank(X_(n)) are filled with seeded Gaussian noise) or fully at random (seeded). Stops when the relative error ||T -
  T_hat||_F / ||T||_F changes by less than ``tol`` between sweeps, the error computed without forming T_hat from
  ||T||^2 - 2 <T, T_hat> + ||T_hat||^2.
  Stored: R (sum_k dim_k + 1) numbers (lambda is kept as its own vector).
* Tucker / HOOI (De Lathauwer, De Moor & Vandewalle 2000, "A multilinear singular value decomposition" (HOSVD) and
  "On the best rank-(R1, ..., RN) approximation of higher-order tensors" (HOOI)): T ~ G x_1 U_1 ... x_N U_N
  with orthonormal U_k (dim_k x r_k) and core G (r_1 x ... x r_N). HOSVD init (U_k = leading r_k left singular
  vectors of T_(k)), then HOOI sweeps: U_k <- leading r_k left singular vectors of (T x_{j != k} U_j^T)_(k); the core
  is G = T x_1 U_1^T ... x_N U_N^T and ||T - T_hat||^2 = ||T||^2 - ||G||^2 (monotone in the sweeps). Stored:
  prod_k r_k + sum_k dim_k r_k. Tucker-2 on convolutions / linear layers with per-mode ranks chosen by EVBMF on the
  mode unfoldings is Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications"; ``mode_spectra`` supplies the spectra such a selector needs.
* Tensor train (Oseledets 2011, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), Alg. 1 "TT-SVD"):
  T[n_1..n_N] = G_1[n_1] ... G_N[n_N] with cores (r_{k-1}, n_k, r_k), fitted by sequential truncated SVDs of the
  reshaped remainder (deterministic). Error bound (Thm 2.2): ||T - T_tt||^2 <= sum_k sum_{i > r_k} s_i(T_<k>)^2 with
  T_<k> the k-th sequential unfolding (prod n_1..n_k x prod n_{k+1}..n_N) -- ``tt_spectra`` returns those s_i.
  Stored: sum_k r_{k-1} n_k r_k.
* TT-matrix (Novikov, Podoprikhin, Osokin & Vetrov 2015, "Tensorizing Neural Networks"): the format above, fitted by
  TT-SVD of the permuted tensor; the forward pass contracts x reshaped (batch, i_1..i_d) core by core.
  Stored: sum_k r_{k-1} o_k i_k r_k.

Contraction routes (batch B; no dense W is formed, every step is a GEMM) -- ``_apply_weight``:
* CP: z = (x @ KR(B_1..B_q)) * lambda, y = z @ KR(A_1..A_p)^T, the Khatri-Rao products (in x R, out x R) rebuilt per
  call -- B R (in + out) multiply-adds, like a rank-R matrix factorization (at equal parameters R is ~ (in + out) /
  sum(dims) times larger, so CP is the slowest format per parameter).
* Tucker: project the input modes (i_k -> r_k), one GEMM with the core as (prod r_out x prod r_in), expand the output
  modes (r_k -> o_k).
* TT: input cores last to first (each a GEMM with the core as (r_{k-1}) x (i_k r_k)), then output cores last to first.
* TTM: one GEMM per core, (B prod_{j<k} i_j prod_{j>k} o_j) x (i_k r_k) times (i_k r_k) x (o_k r_{k-1}), plus one
  permute of the intermediate; cost grows with r_{k-1} r_k, so TTM is cheap only at small ranks.

Ranks: CP one int R >= 1 (not clipped: CP rank may exceed every dimension); Tucker one rank per tensor mode; TT/TTM
the internal ranks r_1..r_{N-1} (len = number of cores - 1). Tucker and TT/TTM ranks are clipped to the largest
feasible value -- Tucker: r_k <= dim_k and r_k <= prod_{j != k} r_j; TT: r_k <= r_{k-1} n_k and r_k <= n_{k+1}
r_{k+1} -- so a huge rank means "full" and reconstructs T exactly. ``params_*`` use the clipped ranks.

Parameter counts: ``layer.weight_params`` is the number of stored numbers of the factorized weight (the ``params_*``
closed forms); ``layer.params`` adds the bias (passed through unchanged from the original Linear).

Engine: plain torch (float64 SVDs via ``torch.linalg``), so fitting runs on W's device (GPU included) and the
module needs nothing beyond torch and numpy. tensorly serves only as the reference in the tests.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "factor_dims",
    "TensorLinear",
    "CPLinear",
    "TuckerLinear",
    "TTLinear",
    "TTMLinear",
    "fit_cp",
    "fit_tucker",
    "fit_tt",
    "fit_ttm",
    "params_cp",
    "params_tucker",
    "params_tt",
    "params_ttm",
    "clip_tucker_ranks",
    "clip_tt_ranks",
    "mode_spectra",
    "tt_spectra",
]

Dims = Sequence[int]


# ---------------------------------------------------------------------------------------------------------------------
# Reshaping
# ---------------------------------------------------------------------------------------------------------------------


def _prime_factors(n: int) -> list[int]:
    primes, p = [], 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    return primes


def factor_dims(n: int, order: int) -> tuple[int, ...]:
    """Split n into ``order`` factors (product exactly n), balanced by the greedy prime rule; sorted descending."""
    n, order = int(n), int(order)
    if n < 1 or order < 1:
        raise ValueError(f"factor_dims needs n >= 1 and order >= 1, got n={n}, order={order}")
    dims = [1] * order
    for p in sorted(_prime_factors(n), reverse=True):
        dims[dims.index(min(dims))] *= p
    return tuple(sorted(dims, reverse=True))


def _resolve_dims(W: torch.Tensor, out_dims: Dims | None, in_dims: Dims | None) -> tuple[tuple[int, ...], ...]:
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(W.shape)}")
    out_features, in_features = W.shape
    out_dims = factor_dims(out_features, 2) if out_dims is None else tuple(int(d) for d in out_dims)
    in_dims = factor_dims(in_features, 2) if in_dims is None else tuple(int(d) for d in in_dims)
    if math.prod(out_dims) != out_features or math.prod(in_dims) != in_features:
        raise ValueError(
            f"out_dims {out_dims} / in_dims {in_dims} do not multiply to the weight shape {tuple(W.shape)}"
        )
    if min(out_dims + in_dims) < 1:
        raise ValueError("all dims must be >= 1")
    return out_dims, in_dims


def _weight_tensor(W: torch.Tensor, out_dims: Dims, in_dims: Dims) -> torch.Tensor:
    """The float64 (p + q)-way tensor T = W.reshape(*out_dims, *in_dims), detached."""
    return W.detach().to(torch.float64).reshape(*out_dims, *in_dims)


def _ttm_tensor(W: torch.Tensor, out_dims: Dims, in_dims: Dims) -> torch.Tensor:
    """The d-way tensor of the TT-matrix format: modes (o_1 i_1, ..., o_d i_d), each pair merged (o_k the slower)."""
    d = len(out_dims)
    if len(in_dims) != d:
        raise ValueError(f"the TT-matrix format pairs modes: len(out_dims)={d} != len(in_dims)={len(in_dims)}")
    T = _weight_tensor(W, out_dims, in_dims)
    order = [axis for k in range(d) for axis in (k, d + k)]
    return T.permute(*order).reshape([o * i for o, i in zip(out_dims, in_dims)])


def unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n unfolding: dim_n x (product of the other dims, in their original order, row-major)."""
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def mode_dot(T: torch.Tensor, M: torch.Tensor, axis: int) -> torch.Tensor:
    """Contract axis ``axis`` of T with the first axis of M (dim x new); the new axis takes its place.

    T is viewed as (a, dim, b) without copying: one GEMM when a or b is 1, a batched GEMM over a otherwise."""
    shape = T.shape
    a, b = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    if b == 1:
        out = T.reshape(a, shape[axis]) @ M
    else:
        out = M.T @ T.reshape(a, shape[axis], b)
    return out.reshape(*shape[:axis], M.shape[1], *shape[axis + 1:])


# ---------------------------------------------------------------------------------------------------------------------
# Ranks and closed-form parameter counts
# ---------------------------------------------------------------------------------------------------------------------


def _as_rank_tuple(ranks, length: int, what: str) -> list[int]:
    ranks = [int(r) for r in ([ranks] * length if isinstance(ranks, (int, np.integer)) else ranks)]
    if len(ranks) != length:
        raise ValueError(f"{what} needs {length} ranks, got {len(ranks)}")
    if any(r < 1 for r in ranks):
        raise ValueError(f"{what} ranks must be >= 1, got {ranks}")
    return ranks


def clip_tucker_ranks(dims: Dims, ranks) -> tuple[int, ...]:
    """Tucker ranks clipped to the feasible set: r_k <= dim_k and r_k <= prod_{j != k} r_j (to a fixed point)."""
    r = [min(rk, d) for rk, d in zip(_as_rank_tuple(ranks, len(dims), "tucker"), dims)]
    changed = len(r) > 1
    while changed:
        changed = False
        for k in range(len(r)):
            bound = math.prod(r[:k] + r[k + 1:])
            if r[k] > bound:
                r[k], changed = bound, True
    return tuple(r)


def clip_tt_ranks(dims: Dims, ranks) -> tuple[int, ...]:
    """Internal TT ranks r_1..r_{N-1} clipped so that r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1} (r_0 = r_N = 1)."""
    N = len(dims)
    r = [1, *_as_rank_tuple(ranks, N - 1, "tt"), 1]
    for k in range(1, N):  # left to right: r_k <= r_{k-1} n_k
        r[k] = min(r[k], r[k - 1] * dims[k - 1])
    for k in range(N - 1, 0, -1):  # right to left: r_k <= n_{k+1} r_{k+1}; keeps the first bound
        r[k] = min(r[k], dims[k] * r[k + 1])
    return tuple(r[1:-1])


def params_cp(out_dims: Dims, in_dims: Dims, rank: int) -> int:
    """R (sum of all dims) factor entries + R weights lambda."""
    rank = _as_rank_tuple(rank, 1, "cp")[0]
    return rank * (sum(out_dims) + sum(in_dims) + 1)


def params_tucker(out_dims: Dims, in_dims: Dims, ranks) -> int:
    """prod r_k (core) + sum dim_k r_k (factors), at the clipped ranks."""
    dims = (*out_dims, *in_dims)
    r = clip_tucker_ranks(dims, ranks)
    return math.prod(r) + sum(d * rk for d, rk in zip(dims, r))


def _tt_count(dims: Dims, ranks: Sequence[int]) -> int:
    r = (1, *ranks, 1)
    return sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims)))


def params_tt(out_dims: Dims, in_dims: Dims, ranks) -> int:
    """sum r_{k-1} n_k r_k over the p + q cores, at the clipped ranks."""
    dims = (*out_dims, *in_dims)
    return _tt_count(dims, clip_tt_ranks(dims, ranks))


def params_ttm(out_dims: Dims, in_dims: Dims, ranks) -> int:
    """sum r_{k-1} o_k i_k r_k over the d cores, at the clipped ranks."""
    if len(out_dims) != len(in_dims):
        raise ValueError("the TT-matrix format needs len(out_dims) == len(in_dims)")
    dims = [o * i for o, i in zip(out_dims, in_dims)]
    return _tt_count(dims, clip_tt_ranks(dims, ranks))


# ---------------------------------------------------------------------------------------------------------------------
# Spectra (for rank selectors)
# ---------------------------------------------------------------------------------------------------------------------


def mode_spectra(W: torch.Tensor, out_dims: Dims | None = None, in_dims: Dims | None = None) -> list[np.ndarray]:
    """Singular values (descending) of each mode-k unfolding T_(k) of T = W.reshape(*out_dims, *in_dims)."""
    out_dims, in_dims = _resolve_dims(W, out_dims, in_dims)
    T = _weight_tensor(W, out_dims, in_dims)
    return [torch.linalg.svdvals(unfold(T, k)).cpu().numpy() for k in range(T.ndim)]


def tt_spectra(
    W: torch.Tensor, out_dims: Dims | None = None, in_dims: Dims | None = None, matrix_format: bool = False
) -> list[np.ndarray]:
    """Singular values of the sequential unfoldings T_<k> (k = 1..N-1): the candidates for the TT rank r_k.

    ``matrix_format=False``: of T = W.reshape(*out_dims, *in_dims) (the ``tt`` format); ``True``: of the permuted
    tensor with modes (o_1 i_1, ..., o_d i_d) (the ``ttm`` format). Discarding s_i(T_<k>), i > r_k, costs at most
    their squared sum in ||T - T_tt||_F^2 (Oseledets 2011, Thm 2.2).
    """
    out_dims, in_dims = _resolve_dims(W, out_dims, in_dims)
    T = _ttm_tensor(W, out_dims, in_dims) if matrix_format else _weight_tensor(W, out_dims, in_dims)
    dims = T.shape
    return [
        torch.linalg.svdvals(T.reshape(math.prod(dims[:k]), -1)).cpu().numpy() for k in range(1, len(dims))
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------


class TensorLinear(nn.Module):
    """Base: y = W x + bias with W held in a tensor format; x (..., in) -> y (..., out).

    Subclasses implement ``_apply_weight`` (x as (batch, in) -> (batch, out), without bias), ``to_dense``,
    ``_factor_tensors`` (the tensors W is a function of) and ``_einsum_operands`` (the same as einsum operands).
    ``weight_params``: stored numbers of the factorized weight; ``params``: that plus the bias.

    Routes (all exact; they agree up to floating-point association):

    * ``reconstruct``: ``to_dense`` then one dense GEMM. When no gradient is needed (``torch.no_grad`` /
      ``inference_mode``, or factors that do not require grad) the dense weight is built once and kept (``_dense
      cache``, not a parameter or buffer: ``state_dict``, ``weight_params``, ``params`` and pickles do not see it),
      so an inference forward is exactly the dense ``F.linear`` of the same size. The cache is keyed on the identity,
      ``_version`` counter and storage pointer of every tensor in ``_factor_tensors()``: an optimizer step, any
      in-place edit under ``no_grad``, ``load_state_dict``, ``.to()`` / ``.half()`` or a factor list swapped for other
      tensors all rebuild it. (Edits through ``param.data`` bypass the version counter: call ``clear_caches()``.)
      Memory: one out x in weight per layer while cached -- the price of inference at dense speed.
    * ``contraction``: the format's hand-written chain of GEMMs (``_apply_weight``), FLOPs linear in the rows.
    * ``planned``: one einsum of the factors and x (batch, i_1..i_q) whose pairwise contraction order is searched
      by opt_einsum (``contract_expression(..., optimize="auto-hq")``: exhaustive for up to 6 operands, dynamic
      programming above), planned once per (layer, batch rows) and kept. Absent when opt_einsum is not installed.
    * ``kronecker`` (``TuckerLinear``, measured choice with grad only): the weight rebuilt as (U_1 (x) ... (x) U_p)
      G_(out x in) (U_{p+1} (x) ... (x) U_N)^T -- two Kronecker products (elementwise) and two GEMMs instead of N
      mode products -- then one GEMM. More FLOPs than ``to_dense`` but fewer, larger kernels: ~2x faster to rebuild
      (forward and backward) on the small ViT / digits weights, ~2.5x slower on the 512x784 MNIST one, so it is
      only ever taken where timed faster; the FLOP model never takes it.

    Choice (``route``), made once per (layer shape, batch rows, whether the weight may be cached):

    * measured (the default): the first forward of a (class, dims, factor shapes, rows rounded up to a power of two,
      cached or not, which factors require grad, dtype, device, torch threads) times every route on a batch of ones
      of that many rows -- one warm-up call each, then ``MEASURE_REPEATS`` interleaved rounds, the minimum of each
      (``torch.cuda.synchronize`` around every call on a GPU) -- and keeps the fastest in ``ROUTE_WISDOM``, shared
      by every layer of that key (a ViT's twelve qkv layers are timed once).
      Without grad (cached weight) a route is timed as the forward; with grad as forward plus backward to the factors
      (``torch.autograd.grad``, nothing accumulates in ``.grad``), what a training step pays. A contraction replaces
      reconstruct only when it is at least ``MEASURE_MARGIN`` (5%) faster, so near-ties keep the one-GEMM route and
      a rerun does not flip between routes on noise. The timing costs ~(1 + ``MEASURE_REPEATS``) x 3 forwards, once
      per machine: the choice is also written to the machine's route wisdom on disk (``RouteWisdom``), which every
      later process -- a suite's other workers, a rerun, a resume -- reads instead of timing, so their routes, and
      with them their numbers, are the same. (A choice made on a loaded machine can be the slower route; deleting
      ``<cache root>/tensor-routes/`` times again.)
    * FLOP model (``flop_route``), used when ``torch.are_deterministic_algorithms_enabled()`` (the harness's
      ``--deterministic``: a timed choice could differ between runs and change the floating-point association), when
      ``CONTRACTION_COST`` is set to a number (a calibration for the machine at hand: then that weight), and where
      timing is not possible (``torch.compile`` tracing, CUDA graph capture, devices other than CPU and CUDA; then
      the choice is not stored): the route with the smallest cost, where the costs are FLOPs from ``torch.utils.flop_counter``
      (``flop_counts``) -- reconstruct: ``to_dense``'s FLOPs (0 when cached) plus rows x 2 in out; contraction: rows
      x its per-row FLOPs x c; planned: its FLOPs at that batch x c, c = ``CONTRACTION_COST`` or, while that is None,
      ``FLOP_MODEL_COST`` = 3 (the model as it was before the timed choice). Ties go to reconstruct. c stands for the
      time per FLOP of a chain of small GEMMs and permutations relative to one large GEMM; measured on one CPU thread
      it ranges from ~1 to over 10 across the shipped layers and formats (and depends on the BLAS, the shapes and the
      device), so no single constant is right for all of them -- hence the timed choice by default.

    Every route computes the same product; in float32 the routes differ from reconstruct by floating-point
    association only: at most 7.9e-7 of the largest output on the shipped ViT and MLP layers at param_ratio 0.5, but
    1.006e-6 for CP's hand-written contraction of the 10x512 MNIST layer (2.5x the dense time there: not taken in our runs);
    the tests check 1e-6 for every format and route on the ViT qkv shape, the benchmark reports every layer.
    """

    CONTRACTION_COST: float | None = None  # None: time the routes (class docstring); a number: the FLOP model with it
    FLOP_MODEL_COST = 3.0  # the FLOP model's contraction weight while CONTRACTION_COST is None
    MEASURE_REPEATS = 5
    MEASURE_MARGIN = 0.05
    _uncached_routes: tuple[str, ...] = ()  # further measured routes where the weight is rebuilt per call (Tucker)

    format_name = "tensor"

    # instance-__dict__ caches, dropped on pickling / deepcopy and by ``clear_caches`` / ``_apply`` (.to, .half, ...)
    _CACHE_KEYS = ("_dense_cache", "_routes", "_plans", "_flop_counts")

    def __init__(self, out_dims: Dims, in_dims: Dims, bias: torch.Tensor | None):
        super().__init__()
        self.out_dims, self.in_dims = tuple(int(d) for d in out_dims), tuple(int(d) for d in in_dims)
        if not self.out_dims or not self.in_dims:
            raise ValueError("out_dims and in_dims need at least one mode each")
        self.out_features, self.in_features = math.prod(self.out_dims), math.prod(self.in_dims)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @staticmethod
    def _param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))

    @property
    def weight_params(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if name != "bias")

    @property
    def params(self) -> int:
        return self.weight_params + (0 if self.bias is None else self.bias.numel())

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The dense out x in weight the factors represent (differentiable; built afresh on every call)."""
        raise NotImplementedError

    def _factor_tensors(self) -> list[torch.Tensor]:
        """Every tensor the weight depends on (read at call time: a caller may swap a factor list for other tensors)."""
        raise NotImplementedError

    def _einsum_operands(self) -> tuple[list[str], list[torch.Tensor]]:
        """Subscripts and tensors of the factors as einsum operands; output modes are letters 0..p-1 of
        ``_LETTERS``, input modes p..p+q-1, internal (rank) modes after them."""
        raise NotImplementedError

    def _member(self, name: str):
        """``getattr(self, name)`` without ``nn.Module.__getattr__`` (~1 us a call, as much as the rest of a cached
        forward's bookkeeping): the instance ``__dict__`` first (a list swapped in for a factor list), then the
        parameters, buffers and submodules."""
        d = self.__dict__
        if name in d:
            return d[name]
        for store in ("_parameters", "_buffers", "_modules"):
            if name in d[store]:
                return d[store][name]
        return getattr(self, name)  # the usual AttributeError

    # -- caches ----------------------------------------------------------------------------------------------------
    def clear_caches(self) -> None:
        """Drop the cached dense weight, routes and contraction plans (needed only after edits through ``.data``)."""
        for key in self._CACHE_KEYS:
            self.__dict__.pop(key, None)

    def _apply(self, fn, *args, **kwargs):  # .to / .half / .cuda / ...: new dtype or device, nothing cached holds
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        for key in self._CACHE_KEYS:
            state.pop(key, None)
        return state

    def cached_dense(self, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``to_dense()`` built once and reused while every factor tensor is the same object at the same version
        (class docstring). Only for forwards that need no gradient: the cached tensor carries no graph. ``tensors``:
        ``_factor_tensors()`` when the caller has just read them."""
        tensors = self._factor_tensors() if tensors is None else tensors
        state = [(t._version, t.data_ptr()) for t in tensors]
        entry = self.__dict__.get("_dense_cache")
        if (entry is not None and entry[1] == state and len(entry[0]) == len(tensors)
                and all(map(operator.is_, entry[0], tensors))):
            return entry[2]
        with torch.no_grad():
            weight = self.to_dense()
        self.__dict__["_dense_cache"] = (tensors, state, weight)  # holding the tensors: their ids stay unique
        return weight

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs (..., {self.in_features}), got {tuple(x.shape)}")
        tensors = self._factor_tensors()  # read once per call: the factors are read again only on other routes
        cacheable = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        route = self.route(x.numel() // self.in_features, cached=cacheable)
        if cacheable and route == "reconstruct":  # the inference path: one GEMM on the cached weight
            return torch.nn.functional.linear(x, self.cached_dense(tensors), self._member("bias"))
        return self._route_forward(route, x, cacheable)

    def _route_forward(self, route: str, x: torch.Tensor, cacheable: bool) -> torch.Tensor:
        if route == "reconstruct":  # the bias fused into the GEMM (addmm), as nn.Linear does
            weight = self.cached_dense() if cacheable else self.to_dense()
            return torch.nn.functional.linear(x, weight, self._member("bias"))
        if route == "kronecker":  # TuckerLinear only: the weight rebuilt through Kronecker products, then one GEMM
            return torch.nn.functional.linear(x, self._to_dense_kronecker(), self._member("bias"))
        rows = x.reshape(-1, self.in_features)
        y = self._planned(rows) if route == "planned" else self._apply_weight(rows)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _plan(self, rows: int):
        """The opt_einsum expression of y (rows, o_1..o_p) from the factors and x (rows, i_1..i_q), planned once per
        batch size; None without opt_einsum."""
        plans = self.__dict__.setdefault("_plans", {})
        if rows not in plans:
            try:
                import opt_einsum
            except ImportError:
                plans[rows] = None
            else:
                subscripts, tensors = self._einsum_operands()
                p, q = len(self.out_dims), len(self.in_dims)
                batch = _LETTERS[-1]
                equation = (",".join([*subscripts, batch + _LETTERS[p:p + q]]) + "->" + batch + _LETTERS[:p])
                shapes = [tuple(t.shape) for t in tensors] + [(rows, *self.in_dims)]
                plans[rows] = opt_einsum.contract_expression(equation, *shapes, optimize="auto-hq")
        return plans[rows]

    def _planned(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        _, tensors = self._einsum_operands()
        y = self._plan(n)(*tensors, x.reshape(n, *self.in_dims), backend="torch")
        return y.reshape(n, self.out_features)

    def flop_counts(self, rows: int | None = None) -> dict[str, int]:
        """FLOPs (2 x multiply-adds of the matrix products, ``torch.utils.flop_counter``) of the hand-written
        contraction for one row, of ``to_dense``, of one dense row (2 in out), and -- given ``rows`` -- of the planned
        contraction of that many rows (``planned``; absent without opt_einsum). Counted once per layer (and batch size:
        the factors' shapes never change)."""
        counts = self.__dict__.get("_flop_counts")
        some = next(iter(self._factor_tensors()))
        if counts is None:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad():
                with FlopCounterMode(display=False) as contraction:
                    self._apply_weight(torch.zeros(1, self.in_features, dtype=some.dtype, device=some.device))
                with FlopCounterMode(display=False) as reconstruction:
                    self.to_dense()
            counts = {"contraction_per_row": contraction.get_total_flops(),
                      "reconstruct": reconstruction.get_total_flops(),
                      "dense_per_row": 2 * self.in_features * self.out_features, "planned": {}}
            self.__dict__["_flop_counts"] = counts
        out = {k: v for k, v in counts.items() if k != "planned"}
        if rows is not None:
            rows = int(rows)
            if rows not in counts["planned"]:
                flops = None
                if self._plan(rows) is not None:
                    from torch.utils.flop_counter import FlopCounterMode

                    with torch.no_grad(), FlopCounterMode(display=False) as planned:
                        self._planned(torch.zeros(rows, self.in_features, dtype=some.dtype, device=some.device))
                    flops = planned.get_total_flops()
                counts["planned"][rows] = flops
            if counts["planned"][rows] is not None:
                out["planned"] = counts["planned"][rows]
        return out

    def route_costs(self, rows: int, cached: bool = False) -> dict[str, float]:
        """Each route's cost for a batch of ``rows`` (class docstring); ``cached``: the dense weight may be reused."""
        c, k = self.flop_counts(rows), self.contraction_cost()
        costs = {"reconstruct": (0 if cached else c["reconstruct"]) + rows * c["dense_per_row"],
                 "contraction": k * rows * c["contraction_per_row"]}
        if "planned" in c:
            costs["planned"] = k * c["planned"]
        return costs

    def contraction_cost(self) -> float:
        """The FLOP model's weight of a contraction FLOP: ``CONTRACTION_COST``, or ``FLOP_MODEL_COST`` while it is None."""
        return self.FLOP_MODEL_COST if self.CONTRACTION_COST is None else float(self.CONTRACTION_COST)

    def flop_route(self, rows: int, cached: bool = False) -> str:
        """The FLOP model's route for a batch of ``rows``: the cheapest by ``route_costs`` (ties to the earlier of
        reconstruct, contraction, planned)."""
        costs = self.route_costs(rows, cached)
        return min(costs, key=costs.__getitem__)  # dicts keep order: ties go to reconstruct

    def route(self, rows: int, cached: bool = False) -> str:
        """``reconstruct``, ``contraction``, ``planned`` (or Tucker's ``kronecker``) for a batch of ``rows`` (class
        docstring): the measured choice, or ``flop_route`` in deterministic mode; decided once per (rows, cached, mode, torch threads,
        ``CONTRACTION_COST``) for this layer, and the measurement once per process for its key."""
        measured = self.CONTRACTION_COST is None and not torch.are_deterministic_algorithms_enabled()
        routes = self.__dict__.setdefault("_routes", {})
        key = (rows, cached, measured, torch.get_num_threads(), self.CONTRACTION_COST)
        chosen = routes.get(key)
        if chosen is None:
            entry = self.measured_routes(rows, cached) if measured else None
            if entry is None:
                chosen = self.flop_route(rows, cached)
                if measured and not self._can_measure():  # not stored: a later call may be able to time the routes
                    return chosen
            else:
                chosen = entry["route"]
            routes[key] = chosen
        return chosen

    def _measure_key(self, rows: int, cached: bool) -> tuple:
        tensors = self._factor_tensors()
        bias = self._member("bias")
        grads = None if cached else (tuple(t.requires_grad for t in tensors), bias is not None and bias.requires_grad)
        return (type(self), self.out_dims, self.in_dims, tuple(tuple(t.shape) for t in tensors), bias is not None,
                1 << max(int(rows) - 1, 0).bit_length(), cached, grads, tensors[0].dtype, str(tensors[0].device),
                torch.get_num_threads())

    def _can_measure(self) -> bool:
        """Timing the routes is possible here: a CPU or CUDA tensor, not under ``torch.compile`` tracing, no CUDA
        graph being captured. (A dispatch mode such as a ``FlopCounterMode`` that a caller opens is not detected --
        torch offers no public test for one -- so a first forward under it also counts the timing's operations: run
        one forward before counting.)"""
        device = self._factor_tensors()[0].device
        if device.type not in ("cpu", "cuda"):
            return False
        if torch.compiler.is_compiling():
            return False
        return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def measured_routes(self, rows: int, cached: bool = False) -> dict | None:
        """The process-level timing entry for this layer's key (class docstring): ``{"route": the choice, "times":
        {route: seconds}, "rows": the batch it was timed on}``, timing the routes now if no layer of the key has;
        None where timing is not possible (``_can_measure``)."""
        key = self._measure_key(rows, cached)
        entry = ROUTE_WISDOM.get(key)  # this process's or an earlier one's choice on this machine
        if entry is None:
            if not self._can_measure():
                return None
            times = self._time_routes(rows, cached)
            best = min(times, key=times.__getitem__)
            if best != "reconstruct" and times[best] > (1.0 - self.MEASURE_MARGIN) * times["reconstruct"]:
                best = "reconstruct"
            entry = {"route": best, "times": times, "rows": int(rows)}
            ROUTE_WISDOM.put(key, entry)
        return entry

    def _time_routes(self, rows: int, cached: bool) -> dict[str, float]:
        """Seconds per call of each route on ``rows`` rows of ones: the forward without grad (``cached``; the
        reconstruct route reads the cached weight) or forward + backward to every factor (and bias) requiring grad;
        one warm-up call each, then the minimum over ``MEASURE_REPEATS`` interleaved rounds."""
        import time

        some = self._factor_tensors()[0]
        x = torch.ones(int(rows), self.in_features, dtype=some.dtype, device=some.device)
        routes = ["reconstruct", "contraction"] + (["planned"] if self._plan(int(rows)) is not None else [])
        routes += [] if cached else list(self._uncached_routes)
        bias = self._member("bias")
        wrt = [t for t in [*self._factor_tensors(), bias] if t is not None and t.requires_grad]
        backward = not cached and bool(wrt) and not torch.is_inference_mode_enabled()
        seed = torch.ones(int(rows), self.out_features, dtype=some.dtype, device=some.device) if backward else None

        def call(route: str) -> None:
            if backward:
                with torch.enable_grad():
                    torch.autograd.grad(self._route_forward(route, x, False), wrt, grad_outputs=seed)
            else:
                with torch.no_grad():
                    self._route_forward(route, x, cached)

        sync = torch.cuda.synchronize if some.device.type == "cuda" else (lambda: None)
        for route in routes:
            call(route)
        times = dict.fromkeys(routes, math.inf)
        for _ in range(max(1, int(self.MEASURE_REPEATS))):
            for route in routes:
                sync()
                start = time.perf_counter()
                call(route)
                sync()
                times[route] = min(times[route], time.perf_counter() - start)
        return times

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, out_dims={self.out_dims}, "
            f"in_dims={self.in_dims}, {self._rank_repr()}, bias={self.bias is not None}"
        )

    def _rank_repr(self) -> str:
        return ""


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # einsum subscripts; the last one is the batch


class RouteWisdom:
    """The measured route choices of this machine, kept on disk (as FFTW keeps its "wisdom"): the first process
    that times a key writes its choice, and every later process and run on the machine reuses it instead of timing
    again -- so reruns, resumes and the worker processes of one suite take the same routes, and their numbers stay
    bit-identical as with a fixed rule. File: ``<cache root>/tensor-routes/<machine>.json`` where ``<machine>``
    hashes the CPU model, the architecture and torch's version (the CUDA device's name is in each key). Written
    atomically after each new measurement (merged with what other processes wrote meanwhile); an unreadable file
    counts as empty. Delete the folder to time again (e.g. after moving the cache to another machine type). The
    entries, ``{"route", "times", "rows"}`` by ``text(key)``, are held in memory as last read or written: the process
    table every layer of a key shares."""

    def __init__(self):
        self.loaded: tuple[Path, dict[str, dict]] | None = None  # (file, its entries) as last read or written

    def entries(self) -> dict[str, dict]:
        """The entries held in memory (empty before the first ``get`` or ``put``)."""
        return {} if self.loaded is None else dict(self.loaded[1])

    def forget(self) -> None:
        """Drop what is held in memory: the next ``get`` reads the file again (as a new process would)."""
        self.loaded = None

    @functools.cached_property
    def machine(self) -> str:
        import hashlib
        import platform

        cpu = platform.processor()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
        except OSError:
            pass
        return hashlib.sha256(f"{cpu}|{platform.machine()}|{torch.__version__}".encode()).hexdigest()[:16]

    def path(self) -> Path:
        from rankbench.files import cache_root

        return cache_root() / "tensor-routes" / f"{self.machine}.json"

    @staticmethod
    def text(key: tuple) -> str:
        return repr(tuple(f"{k.__module__}.{k.__qualname__}" if isinstance(k, type) else k for k in key))

    def _read(self) -> dict[str, dict]:
        import json

        try:
            data = json.loads(self.path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: tuple) -> dict | None:
        path = self.path()
        if self.loaded is None or self.loaded[0] != path:
            self.loaded = (path, self._read())
        entry = self.loaded[1].get(self.text(key))
        return entry if isinstance(entry, dict) and isinstance(entry.get("route"), str) else None

    def put(self, key: tuple, entry: dict) -> None:
        import json

        from rankbench.files import atomic_write

        merged = self._read()
        merged[self.text(key)] = entry
        self.loaded = (self.path(), merged)
        try:
            atomic_write(self.path(), json.dumps(merged, sort_keys=True, indent=0))
        except OSError:  # a read-only cache: the choice still holds for this process
            pass


ROUTE_WISDOM = RouteWisdom()


def _tensors(items) -> list[torch.Tensor]:
    """The tensors of a ParameterList (read from its ``_parameters``: slicing a ParameterList builds a new module,
    ~30 us, and iterating it ~10 us -- as much as a small GEMM) or of a plain list standing in for one."""
    if isinstance(items, nn.ParameterList):
        return list(items._parameters.values())
    return list(items)


def _kronecker(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Kronecker product of matrices, first matrix's indices slowest: (prod rows) x (prod cols)."""
    K = mats[0]
    for M in mats[1:]:
        K = (K[:, None, :, None] * M[None, :, None, :]).reshape(K.shape[0] * M.shape[0], K.shape[1] * M.shape[1])
    return K


def _khatri_rao(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, first matrix's row index slowest: (prod dims) x R."""
    K = mats[0]
    for M in mats[1:]:
        K = (K[:, None, :] * M[None, :, :]).reshape(-1, K.shape[1])
    return K


class CPLinear(TensorLinear):
    """W = sum_r lambda_r a^(1)_r o ... o a^(p+q)_r, reshaped; factors[k] is dims[k] x R (output modes first)."""

    format_name = "cp"

    def __init__(self, factors: Sequence[torch.Tensor], weights: torch.Tensor, out_dims: Dims, in_dims: Dims,
                 bias: torch.Tensor | None = None):
        super().__init__(out_dims, in_dims, bias)
        dims = (*self.out_dims, *self.in_dims)
        self.rank = int(weights.shape[0])
        if len(factors) != len(dims) or any(tuple(A.shape) != (d, self.rank) for A, d in zip(factors, dims)):
            raise ValueError(f"CP factors {[tuple(A.shape) for A in factors]} do not match dims {dims}, R={self.rank}")
        self.factors = nn.ParameterList([self._param(A) for A in factors])
        self.weights = self._param(weights)

    def _rank_repr(self) -> str:
        return f"rank={self.rank}"

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        # z[b, r] = lambda_r sum_j x[b, j_1..j_q] prod_k B_k[j_k, r] = (x @ KR(B_1..B_q))[b, r] lambda_r, then
        # y[b, o] = sum_r z[b, r] KR(A_1..A_p)[o, r]. The Khatri-Rao products (in x R and out x R, rebuilt per call at
        # (in + out) R multiplications) turn both contractions into one GEMM each: B (in + out) R multiply-adds for a
        # batch of B, like a rank-R matrix factorization, and no (batch, in / i_q, R) intermediate.
        p, factors = len(self.out_dims), _tensors(self.factors)
        z = (x @ _khatri_rao(factors[p:])) * self.weights
        return z @ _khatri_rao(factors[:p]).T

    def to_dense(self) -> torch.Tensor:
        p, factors = len(self.out_dims), _tensors(self.factors)
        left = _khatri_rao(factors[:p]) * self.weights  # (out, R)
        return left @ _khatri_rao(factors[p:]).T

    def _factor_tensors(self) -> list[torch.Tensor]:
        return [*_tensors(self._member("factors")), self._member("weights")]

    def _einsum_operands(self) -> tuple[list[str], list[torch.Tensor]]:
        modes, r = len(self.out_dims) + len(self.in_dims), _LETTERS[-2]  # A_k[n_k, r], lambda[r]
        return [_LETTERS[k] + r for k in range(modes)] + [r], self._factor_tensors()


class TuckerLinear(TensorLinear):
    """W = (core x_1 U_1 ... x_N U_N) reshaped; factors[k] is dims[k] x r_k (output modes first)."""

    format_name = "tucker"

    def __init__(self, core: torch.Tensor, factors: Sequence[torch.Tensor], out_dims: Dims, in_dims: Dims,
                 bias: torch.Tensor | None = None):
        super().__init__(out_dims, in_dims, bias)
        dims = (*self.out_dims, *self.in_dims)
        self.ranks = tuple(int(r) for r in core.shape)
        if (core.ndim != len(dims) or len(factors) != len(dims)
                or any(tuple(U.shape) != (d, r) for U, d, r in zip(factors, dims, self.ranks))):
            raise ValueError(f"Tucker factors {[tuple(U.shape) for U in factors]} do not match dims {dims}, "
                             f"core {self.ranks}")
        self.core = self._param(core)
        self.factors = nn.ParameterList([self._param(U) for U in factors])

    def _rank_repr(self) -> str:
        return f"ranks={self.ranks}"

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        p, n = len(self.out_dims), x.shape[0]
        t = x.reshape(n, *self.in_dims)
        factors = _tensors(self.factors)
        for k, U in enumerate(factors[p:]):  # project each input mode: i_k -> r_k
            t = mode_dot(t, U, 1 + k)
        r_out, r_in = math.prod(self.ranks[:p]), math.prod(self.ranks[p:])
        t = (t.reshape(n, r_in) @ self.core.reshape(r_out, r_in).T).reshape(n, *self.ranks[:p])  # contract the core
        for k, U in enumerate(factors[:p]):  # expand each output mode: r_k -> o_k
            t = mode_dot(t, U.T, 1 + k)
        return t.reshape(n, self.out_features)

    def to_dense(self) -> torch.Tensor:
        t = self.core
        for k, U in enumerate(_tensors(self.factors)):
            t = mode_dot(t, U.T, k)
        return t.reshape(self.out_features, self.in_features)

    _uncached_routes = ("kronecker",)

    def _to_dense_kronecker(self) -> torch.Tensor:
        """``to_dense`` as K_out G K_in^T, K_out = U_1 (x) ... (x) U_p (out x prod r_out), K_in likewise over the
        input modes, G the core as (prod r_out) x (prod r_in); the two GEMMs in the order with fewer FLOPs."""
        p, factors = len(self.out_dims), _tensors(self._member("factors"))
        K_out, K_in = _kronecker(factors[:p]), _kronecker(factors[p:])
        core = self._member("core").reshape(K_out.shape[1], K_in.shape[1])
        (o, r_out), (i, r_in) = K_out.shape, K_in.shape
        if o * r_in * (r_out + i) <= r_out * i * (r_in + o):
            return (K_out @ core) @ K_in.T
        return K_out @ (core @ K_in.T)

    def _factor_tensors(self) -> list[torch.Tensor]:
        return [self._member("core"), *_tensors(self._member("factors"))]

    def _einsum_operands(self) -> tuple[list[str], list[torch.Tensor]]:
        modes = len(self.out_dims) + len(self.in_dims)  # core[r_1..r_N], U_k[n_k, r_k]
        ranks = _LETTERS[modes:2 * modes]
        return [ranks] + [_LETTERS[k] + ranks[k] for k in range(modes)], self._factor_tensors()


def _tt_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores (r_{k-1}, n_k, r_k) into the full tensor (n_1, ..., n_N)."""
    t = cores[0].reshape(-1, cores[0].shape[-1])
    for G in cores[1:]:
        t = (t @ G.reshape(G.shape[0], -1)).reshape(-1, G.shape[-1])
    return t.reshape([G.shape[1] for G in cores])


class TTLinear(TensorLinear):
    """W = TT(cores) reshaped; cores[k] is (r_{k-1}, dims[k], r_k) over the p + q modes (output modes first)."""

    format_name = "tt"

    def __init__(self, cores: Sequence[torch.Tensor], out_dims: Dims, in_dims: Dims, bias: torch.Tensor | None = None):
        super().__init__(out_dims, in_dims, bias)
        dims = (*self.out_dims, *self.in_dims)
        _check_tt_cores(cores, dims)
        self.ranks = tuple(int(G.shape[-1]) for G in cores[:-1])
        self.cores = nn.ParameterList([self._param(G) for G in cores])

    def _rank_repr(self) -> str:
        return f"ranks={self.ranks}"

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        p, n = len(self.out_dims), x.shape[0]
        # Input cores, last first. State t: (n, P, i_k * r_k) with P = i_1..i_{k-1}; each step is one GEMM with the
        # core reshaped (r_{k-1}, i_k r_k), and the result (n, P', i_{k-1}, r_{k-1}) is already the next state.
        t = x.reshape(n, self.in_features, 1)
        cores = _tensors(self.cores)
        for G in reversed(cores[p:]):
            r_prev, i_k, r_k = G.shape
            t = t.reshape(n, -1, i_k * r_k) @ G.reshape(r_prev, i_k * r_k).T
        # Output cores, last first. State t: (n, r_k, Q) with Q = o_{k+1}..o_p; G_k reshaped (r_{k-1} o_k, r_k) @ t
        # gives (n, r_{k-1}, o_k Q). At the end r_0 = 1 and the output index is row-major in (o_1..o_p).
        t = t.reshape(n, -1, 1)
        for G in reversed(cores[:p]):
            r_prev, o_k, r_k = G.shape
            t = (G.reshape(r_prev * o_k, r_k) @ t).reshape(n, r_prev, -1)
        return t.reshape(n, self.out_features)

    def to_dense(self) -> torch.Tensor:
        return _tt_full(_tensors(self.cores)).reshape(self.out_features, self.in_features)

    def _factor_tensors(self) -> list[torch.Tensor]:
        return _tensors(self._member("cores"))

    def _einsum_operands(self) -> tuple[list[str], list[torch.Tensor]]:
        return _tt_operands(self._factor_tensors(), [[k] for k in range(len(self.out_dims) + len(self.in_dims))])


class TTMLinear(TensorLinear):
    """W[(o_1..o_d), (i_1..i_d)] = G_1[o_1, i_1] ... G_d[o_d, i_d]; cores[k] is (r_{k-1}, o_k, i_k, r_k)."""

    format_name = "ttm"

    def __init__(self, cores: Sequence[torch.Tensor], out_dims: Dims, in_dims: Dims,
                 bias: torch.Tensor | None = None):
        super().__init__(out_dims, in_dims, bias)
        if len(self.out_dims) != len(self.in_dims):
            raise ValueError("the TT-matrix format needs len(out_dims) == len(in_dims)")
        if any(tuple(G.shape[1:3]) != (o, i) for G, o, i in zip(cores, self.out_dims, self.in_dims)):
            raise ValueError(f"TTM cores {[tuple(G.shape) for G in cores]} do not match {self.out_dims}/{self.in_dims}")
        _check_tt_cores([G.reshape(G.shape[0], -1, G.shape[-1]) for G in cores],
                        [o * i for o, i in zip(self.out_dims, self.in_dims)])
        self.ranks = tuple(int(G.shape[-1]) for G in cores[:-1])
        self.cores = nn.ParameterList([self._param(G) for G in cores])

    def _rank_repr(self) -> str:
        return f"ranks={self.ranks}"

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        # Novikov et al. 2015: contract x (batch, i_1..i_d) with the cores, last first. State t: (Q, n P, i_k r_k),
        # Q = o_{k+1}..o_d (the output modes done so far, o_{k+1} slowest), P = i_1..i_{k-1}. One GEMM with the core
        # as (i_k r_k) x (o_k r_{k-1}), then o_k moves to the front (one permute-copy) and (i_{k-1}, r_{k-1}) merge.
        cores = _tensors(self.cores)
        n, d = x.shape[0], len(cores)
        t = x.reshape(1, n * self.in_features, 1)
        for k in range(d - 1, -1, -1):
            r_prev, o_k, i_k, r_k = cores[k].shape
            i_prev = self.in_dims[k - 1] if k > 0 else 1
            q, rows = t.shape[0], t.numel() // (t.shape[0] * i_prev * i_k * r_k)  # rows = n P'
            core = cores[k].permute(2, 3, 1, 0).reshape(i_k * r_k, o_k * r_prev).contiguous()
            y = t.reshape(-1, i_k * r_k) @ core  # a contiguous operand keeps the GEMM output row-major
            y = y.reshape(q, rows, i_prev, o_k, r_prev).permute(3, 0, 1, 2, 4)  # (o_k, Q, n P', i_{k-1}, r_{k-1})
            t = y.reshape(o_k * q, rows, i_prev * r_prev)
        # t: (out, n, 1) with the output index row-major in (o_1..o_d).
        return t.reshape(self.out_features, n).T.contiguous()

    def to_dense(self) -> torch.Tensor:
        cores = _tensors(self.cores)
        d = len(cores)
        full = _tt_full([G.reshape(G.shape[0], -1, G.shape[-1]) for G in cores])
        full = full.reshape([s for o, i in zip(self.out_dims, self.in_dims) for s in (o, i)])
        order = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        return full.permute(*order).reshape(self.out_features, self.in_features)

    def _factor_tensors(self) -> list[torch.Tensor]:
        return _tensors(self._member("cores"))

    def _einsum_operands(self) -> tuple[list[str], list[torch.Tensor]]:
        d = len(self.out_dims)
        return _tt_operands(self._factor_tensors(), [[k, d + k] for k in range(d)])


def _tt_operands(cores: list[torch.Tensor], modes: list[list[int]]) -> tuple[list[str], list[torch.Tensor]]:
    """einsum operands of TT cores (r_{k-1}, *physical, r_k): core k's physical modes are the letters ``modes[k]``,
    its bonds letters after all physical ones; the boundary bonds (r_0 = r_N = 1) are squeezed away."""
    first_bond = 1 + max(m for ms in modes for m in ms)
    bond = ["", *_LETTERS[first_bond:first_bond + len(cores) - 1], ""]
    subscripts, tensors = [], []
    for k, (G, ms) in enumerate(zip(cores, modes)):
        if k == 0:
            G = G.squeeze(0)
        if k == len(cores) - 1:
            G = G.squeeze(-1)
        subscripts.append(bond[k] + "".join(_LETTERS[m] for m in ms) + bond[k + 1])
        tensors.append(G)
    return subscripts, tensors


def _check_tt_cores(cores: Sequence[torch.Tensor], dims: Dims) -> None:
    shapes = [tuple(G.shape) for G in cores]
    ok = len(cores) == len(dims) and all(len(s) == 3 for s in shapes)
    ok = ok and shapes[0][0] == 1 and shapes[-1][-1] == 1
    ok = ok and all(s[1] == d for s, d in zip(shapes, dims))
    ok = ok and all(a[-1] == b[0] for a, b in zip(shapes[:-1], shapes[1:]))
    if not ok:
        raise ValueError(f"TT cores {shapes} do not chain over dims {tuple(dims)}")


# ---------------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------------


def _solve_gram(M: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """M V^+ for the symmetric positive semi-definite R x R matrix V: a Cholesky solve where V is positive definite
    (about 8x cheaper than the pseudo-inverse at R ~ 100; what tensorly does with a plain solve), the
    pseudo-inverse where it is singular (collinear factors). Both give the same least-squares update."""
    L, info = torch.linalg.cholesky_ex(V)
    if int(info) == 0:
        return torch.cholesky_solve(M.T, L).T
    return M @ torch.linalg.pinv(V, hermitian=True)


def fit_cp(
    W: torch.Tensor,
    out_dims: Dims | None = None,
    in_dims: Dims | None = None,
    rank: int = 1,
    n_iter: int = 200,
    tol: float = 1e-9,
    init: str = "svd",
    seed: int = 0,
    bias: torch.Tensor | None = None,
) -> CPLinear:
    """CP-ALS at rank R (Kolda & Bader 2009, Fig. 3.3); stops after ``n_iter`` sweeps or when the relative error
    changes by less than ``tol``. ``init``: "svd" (leading left singular vectors of each unfolding) or "random"."""
    out_dims, in_dims = _resolve_dims(W, out_dims, in_dims)
    R = _as_rank_tuple(rank, 1, "cp")[0]
    T = _weight_tensor(W, out_dims, in_dims)
    N, dims = T.ndim, T.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def noise(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(T.device)

    if init == "svd":
        factors = []
        for k in range(N):
            U = torch.linalg.svd(unfold(T, k), full_matrices=False)[0][:, :R]
            factors.append(torch.cat([U, noise(dims[k], R - U.shape[1])], dim=1) if U.shape[1] < R else U)
    elif init == "random":
        factors = [noise(d, R) for d in dims]
    else:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    factors = [A / A.norm(dim=0).clamp_min(torch.finfo(A.dtype).tiny) for A in factors]
    grams = [A.T @ A for A in factors]
    weights = torch.ones(R, dtype=T.dtype, device=T.device)
    # MTTKRP (X_(k) times the Khatri-Rao product of the other factors) through a two-level split of the modes into
    # halves (a dimension tree): P = T_(left x right) @ KR(right factors) is computed once per sweep and serves every
    # left mode (the right factors do not change while the left ones are updated), then the same for the right half.
    # Two GEMMs of |T| R per sweep instead of N, and no |T| / dim_k x R Khatri-Rao matrix. Same iterates as plain ALS.
    s = N // 2
    left, right = range(0, s), range(s, N)
    T2 = T.reshape(math.prod(dims[:s]), -1)  # (left modes) x (right modes)
    norm2 = float(T.square().sum())
    previous = None
    for _ in range(n_iter):
        for half, other, unfolded in ((left, right, T2), (right, left, T2.T)):
            P = unfolded @ _khatri_rao([factors[j] for j in other])  # (prod of the half's dims, R)
            P = P.reshape(*(dims[j] for j in half), R)
            for k in half:
                V = torch.ones(R, R, dtype=T.dtype, device=T.device)
                for j in range(N):
                    if j != k:
                        V = V * grams[j]
                M = P.movedim(k - half.start, 0).reshape(dims[k], -1, R)  # (dims[k], other modes of the half, R)
                rest = [factors[j] for j in half if j != k]
                M = (M * _khatri_rao(rest)).sum(dim=1) if rest else M[:, 0]  # MTTKRP: dims[k] x R
                A = _solve_gram(M, V)
                weights = A.norm(dim=0)
                factors[k] = A / weights.clamp_min(torch.finfo(A.dtype).tiny)
                grams[k] = factors[k].T @ factors[k]
        # ||T - T_hat||^2 = ||T||^2 - 2 <T, T_hat> + ||T_hat||^2, from the last mode's MTTKRP and the Gram matrices.
        inner = float((weights * (factors[-1] * M).sum(dim=0)).sum())
        norm_hat2 = float(weights @ (V * grams[-1]) @ weights)
        error = math.sqrt(max(norm2 - 2 * inner + norm_hat2, 0.0) / norm2) if norm2 > 0 else 0.0
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    return CPLinear([A.to(W.dtype) for A in factors], weights.to(W.dtype), out_dims, in_dims, bias)


def _leading_left_vectors(M: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(M, full_matrices=False)[0][:, :r]


def fit_tucker(
    W: torch.Tensor,
    out_dims: Dims | None = None,
    in_dims: Dims | None = None,
    ranks=None,
    n_iter: int = 100,
    tol: float = 1e-10,
    bias: torch.Tensor | None = None,
) -> TuckerLinear:
    """HOSVD init + HOOI sweeps (De Lathauwer et al. 2000) at the (clipped) per-mode ranks; stops after ``n_iter``
    sweeps or when the relative error sqrt(||T||^2 - ||G||^2) / ||T|| changes by less than ``tol``."""
    out_dims, in_dims = _resolve_dims(W, out_dims, in_dims)
    T = _weight_tensor(W, out_dims, in_dims)
    N = T.ndim
    r = clip_tucker_ranks(T.shape, T.shape if ranks is None else ranks)
    factors = [_leading_left_vectors(unfold(T, k), r[k]) for k in range(N)]  # HOSVD
    norm2 = float(T.square().sum())

    def project(skip: int | None) -> torch.Tensor:
        t = T
        for j in range(N):
            if j != skip:
                t = mode_dot(t, factors[j], j)
        return t

    core, previous = project(skip=None), None
    for _ in range(n_iter):
        for k in range(N):
            factors[k] = _leading_left_vectors(unfold(project(skip=k), k), r[k])
        core = project(skip=None)
        error = math.sqrt(max(norm2 - float(core.square().sum()), 0.0) / norm2) if norm2 > 0 else 0.0
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    return TuckerLinear(core.to(W.dtype), [U.to(W.dtype) for U in factors], out_dims, in_dims, bias)


def _tt_svd(T: torch.Tensor, ranks) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) at the (clipped) internal ranks: cores (r_{k-1}, n_k, r_k)."""
    dims = T.shape
    r = (1, *clip_tt_ranks(dims, ranks), 1)
    cores, C = [], T
    for k in range(len(dims) - 1):
        C = C.reshape(r[k] * dims[k], -1)
        U, s, Vh = torch.linalg.svd(C, full_matrices=False)
        cores.append(U[:, : r[k + 1]].reshape(r[k], dims[k], r[k + 1]))
        C = s[: r[k + 1], None] * Vh[: r[k + 1]]
    cores.append(C.reshape(r[-2], dims[-1], 1))
    return cores


def fit_tt(
    W: torch.Tensor,
    out_dims: Dims | None = None,
    in_dims: Dims | None = None,
    ranks=None,
    bias: torch.Tensor | None = None,
) -> TTLinear:
    """TT-SVD of T = W.reshape(*out_dims, *in_dims) at the internal ranks (len p + q - 1; None = full)."""
    out_dims, in_dims = _resolve_dims(W, out_dims, in_dims)
    T = _weight_tensor(W, out_dims, in_dims)
    cores = _tt_svd(T, [T.numel()] * (T.ndim - 1) if ranks is None else ranks)
    return TTLinear([G.to(W.dtype) for G in cores], out_dims, in_dims, bias)


def fit_ttm(
    W: torch.Tensor,
    out_dims: Dims | None = None,
    in_dims: Dims | None = None,
    ranks=None,
    bias: torch.Tensor | None = None,
) -> TTMLinear:
    """TT-SVD of the permuted tensor (o_1 i_1, ..., o_d i_d) at the internal ranks (len d - 1; None = full)."""
    out_dims, in_dims = _resolve_dims(W, out_dims, in_dims)
    T = _ttm_tensor(W, out_dims, in_dims)
    cores = _tt_svd(T, [T.numel()] * (T.ndim - 1) if ranks is None else ranks)
    cores = [G.reshape(G.shape[0], o, i, G.shape[-1]).to(W.dtype) for G, o, i in zip(cores, out_dims, in_dims)]
    return TTMLinear(cores, out_dims, in_dims, bias)


# -- convolution kernels ---------------------------------------------------------------------------------------------
# A Conv2d kernel K (out x in x kh x kw) is already a 4-mode tensor; as a matrix it is K.reshape(out, in kh kw), i.e.
# this module's reshaping convention with out_dims = (out,) and in_dims = (in, kh, kw). The fits below reuse
# ``fit_tucker`` / ``fit_cp`` on that view and return factorised convolutions that apply the factors as a sequence of
# smaller convolutions (the kernel is never formed). Only ``groups = 1`` and zero padding given as numbers.

def conv_geometry(conv: nn.Conv2d) -> dict:
    """stride / padding / dilation of ``conv`` as pairs, refusing what the factorised layers cannot reproduce."""
    if conv.groups != 1:
        raise ValueError(f"conv kernels with groups={conv.groups} are not supported (groups = 1 only)")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"conv padding {conv.padding!r} / mode {conv.padding_mode!r}: numeric zero padding only")
    return {"stride": tuple(conv.stride), "padding": tuple(conv.padding), "dilation": tuple(conv.dilation)}


def _conv(weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1, **geometry) -> nn.Conv2d:
    out, per_group, kh, kw = weight.shape
    layer = nn.Conv2d(per_group * groups, out, (kh, kw), groups=groups, bias=bias is not None, **geometry)
    layer.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def clip_tucker2_ranks(shape: Sequence[int], ranks) -> tuple[int, int]:
    """Tucker-2 ranks (r_out, r_in) of a conv kernel, clipped like a 4-way Tucker with full spatial ranks."""
    out, cin, kh, kw = (int(d) for d in shape)
    r_out, r_in = _as_rank_tuple(ranks, 2, "tucker-2")
    clipped = clip_tucker_ranks((out, cin, kh, kw), (r_out, r_in, kh, kw))
    return clipped[0], clipped[1]


def params_tucker2_conv(shape: Sequence[int], ranks) -> int:
    """in r_in (first 1x1 conv) + r_out r_in kh kw (core conv) + r_out out (last 1x1 conv), at the clipped ranks."""
    out, cin, kh, kw = (int(d) for d in shape)
    r_out, r_in = clip_tucker2_ranks(shape, ranks)
    return cin * r_in + r_out * r_in * kh * kw + r_out * out


def params_cp_conv(shape: Sequence[int], rank: int) -> int:
    """R (in + kh + kw + out): two 1x1 convs and two depthwise 1-D convs, lambda folded into the last 1x1 conv."""
    return int(rank) * sum(int(d) for d in shape)


def tucker2_slots(kernel: torch.Tensor) -> tuple[list[np.ndarray], list[tuple[int, int]], list[int]]:
    """The spectra of the kernel's output-channel and input-channel unfoldings (Kim et al. 2016 choose the Tucker-2
    ranks by EVBMF on exactly these), their (rows, cols), and the caps min(rows, cols)."""
    out, cin, kh, kw = kernel.shape
    spectra, dims = [], []
    for mode in (0, 1):
        M = unfold(kernel, mode)
        spectra.append(torch.linalg.svdvals(M).cpu().numpy())
        dims.append((int(M.shape[0]), int(M.shape[1])))
    return spectra, dims, [min(r, c) for r, c in dims]


class TuckerConv2d(nn.Module):
    """Tucker-2 convolution (Kim et al., ICLR 2016): K = G x_1 U_out x_2 U_in, applied as a 1x1 conv by U_in^T
    (in -> r_in), the core conv G (r_in -> r_out, kh x kw, the original stride / padding / dilation) and a 1x1 conv by
    U_out (r_out -> out) carrying the bias."""

    format_name = "tucker"

    def __init__(self, core: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor, bias: torch.Tensor | None,
                 geometry: dict):
        super().__init__()
        self.ranks = (int(core.shape[0]), int(core.shape[1]))
        self.project_in = _conv(U_in.T[:, :, None, None])
        self.core = _conv(core, **geometry)
        self.expand_out = _conv(U_out[:, :, None, None], bias)

    @property
    def weight_params(self) -> int:
        return sum(m.weight.numel() for m in (self.project_in, self.core, self.expand_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand_out(self.core(self.project_in(x)))

    def to_dense(self) -> torch.Tensor:
        """The out x in x kh x kw kernel the factors represent (tests and diagnostics)."""
        U_out, U_in = self.expand_out.weight[:, :, 0, 0], self.project_in.weight[:, :, 0, 0].T
        return mode_dot(mode_dot(self.core.weight, U_out.T, 0), U_in.T, 1)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


class CPConv2d(nn.Module):
    """CP convolution (Lebedev et al., ICLR 2015): K[o, i, y, x] = sum_r lambda_r A_out[o, r] A_in[i, r] A_h[y, r]
    A_w[x, r], applied as a 1x1 conv (in -> R), a depthwise kh x 1 conv and a depthwise 1 x kw conv (the stride,
    padding and dilation split between them by axis) and a 1x1 conv (R -> out, lambda folded in) carrying the bias.
    Exact: the kernel of each component is separable, and zero padding commutes with the channel maps."""

    format_name = "cp"

    def __init__(self, A_out: torch.Tensor, A_in: torch.Tensor, A_h: torch.Tensor, A_w: torch.Tensor,
                 weights: torch.Tensor, bias: torch.Tensor | None, geometry: dict):
        super().__init__()
        R = int(weights.shape[0])
        self.rank = R
        (sh, sw), (ph, pw), (dh, dw) = geometry["stride"], geometry["padding"], geometry["dilation"]
        self.project_in = _conv(A_in.T[:, :, None, None])
        self.vertical = _conv(A_h.T[:, None, :, None], groups=R, stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1))
        self.horizontal = _conv(A_w.T[:, None, None, :], groups=R, stride=(1, sw), padding=(0, pw), dilation=(1, dw))
        self.expand_out = _conv((A_out * weights)[:, :, None, None], bias)

    @property
    def weight_params(self) -> int:
        return sum(m.weight.numel() for m in (self.project_in, self.vertical, self.horizontal, self.expand_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand_out(self.horizontal(self.vertical(self.project_in(x))))

    def to_dense(self) -> torch.Tensor:
        A_out, A_in = self.expand_out.weight[:, :, 0, 0], self.project_in.weight[:, :, 0, 0].T
        A_h, A_w = self.vertical.weight[:, 0, :, 0].T, self.horizontal.weight[:, 0, 0, :].T
        return torch.einsum("or,ir,yr,xr->oiyx", A_out, A_in, A_h, A_w)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def fit_tucker2_conv(conv: nn.Conv2d, ranks, n_iter: int = 20) -> TuckerConv2d:
    """Tucker-2 of ``conv``'s kernel at the (clipped) channel ranks: HOSVD + HOOI of the 4-way kernel with the
    spatial modes at full rank (their square orthogonal factors are folded back into the core), in float64."""
    geometry = conv_geometry(conv)
    kernel = conv.weight.detach().to(torch.float64)
    out, cin, kh, kw = kernel.shape
    r_out, r_in = clip_tucker2_ranks(kernel.shape, ranks)
    fitted = fit_tucker(kernel.reshape(out, -1), (out,), (cin, kh, kw), (r_out, r_in, kh, kw), n_iter=n_iter)
    U_out, U_in, U_h, U_w = (U.detach() for U in fitted.factors)
    core = mode_dot(mode_dot(fitted.core.detach(), U_h.T, 2), U_w.T, 3)  # r_out x r_in x kh x kw
    bias = None if conv.bias is None else conv.bias.detach().to(torch.float64)
    return TuckerConv2d(core, U_out, U_in, bias, geometry).to(conv.weight.dtype)


def fit_cp_conv(conv: nn.Conv2d, rank: int, n_iter: int = 100, tol: float = 1e-7, seed: int = 0) -> CPConv2d:
    """CP-ALS (``fit_cp``) of ``conv``'s 4-way kernel at rank R, as a ``CPConv2d``, in float64."""
    geometry = conv_geometry(conv)
    kernel = conv.weight.detach().to(torch.float64)
    out, cin, kh, kw = kernel.shape
    fitted = fit_cp(kernel.reshape(out, -1), (out,), (cin, kh, kw), int(rank), n_iter=n_iter, tol=tol, seed=seed)
    A_out, A_in, A_h, A_w = (A.detach() for A in fitted.factors)
    bias = None if conv.bias is None else conv.bias.detach().to(torch.float64)
    return CPConv2d(A_out, A_in, A_h, A_w, fitted.weights.detach(), bias, geometry).to(conv.weight.dtype)
