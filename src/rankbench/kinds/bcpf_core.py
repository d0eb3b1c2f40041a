"""The BCPF core (shared by the ``bcpf`` recovery solver and the ``ard`` selector): Bayesian CP factorisation with automatic rank determination, for incomplete N-way tensors.

Paper: Q. Zhao, L. Zhang and A. Cichocki, "Bayesian CP Factorization of Incomplete Tensors with Automatic Rank
Determination", IEEE TPAMI 37(9):1751-1763, 2015 (arXiv:1401.6497). Reference code: the author's MATLAB
``BCPF_TC.m`` (the incomplete-tensor variant, "FBCP"); see ``docs/algorithms.md#bcpf``. This is an independent
torch implementation written from the equations below (tagged B1-B9 here; the paper's own equation numbers are not
reproduced). N = 2 is Bayesian matrix factorisation with ARD.

Model (B1-B3). Y is an I_1 x ... x I_N tensor observed on the index set Omega (mask O), M = |Omega|::

    y_i = sum_r prod_n z^(n)_{i_n r} + eps_i,   eps_i ~ N(0, 1/tau),       i in Omega              (B1)
    p(Z^(n) | lambda) = prod_{i_n} N(z^(n)_{i_n} | 0, Lambda^-1),   Lambda = diag(lambda)            (B2)
    lambda_r ~ Ga(a0, b0),   tau ~ Ga(c0, d0),   a0 = b0 = c0 = d0 = 1e-6                           (B3)

One precision lambda_r per component, shared by all N factors: this is the ARD prior that switches components off.

Mean-field posterior q = prod_n prod_{i_n} N(z^(n)_{i_n} | m_{i_n}, V_{i_n}) prod_r Ga(lambda_r | a_r, b_r)
Ga(tau | c, d). With missing entries the covariance is per row (it depends on which entries of the row are
observed). Writing S^(k)_{i} = m_i m_i^T + V_i for the second moment of row i of factor k, the coordinate updates
are, for every mode n and row i = i_n,

    C_i  = sum_{j in Omega, j_n = i}  Hadamard_{k != n} S^(k)_{j_k}                 (R x R)            (B4)
    V_i  = ( E[tau] C_i + E[Lambda] )^-1                                                             (B5)
    m_i  = E[tau] V_i  sum_{j in Omega, j_n = i}  y_j  Hadamard_{k != n} m^(k)_{j_k}                   (B6)
    a_r  = a0 + 1/2 sum_n I_n,   b_r = b0 + 1/2 sum_n ( ||m^(n)_{:r}||^2 + sum_i V^(n)_{i,rr} ),
                                                                E[lambda_r] = a_r / b_r             (B7)
    c    = c0 + M / 2,   d = d0 + 1/2 E||O * (Y - X)||^2,   E[tau] = c / d,   with
    E||O * (Y - X)||^2 = ||O * Y||^2 - 2 <O * Y, [[m]]> + sum_{j in Omega} 1^T (Hadamard_k S^(k)_{j_k}) 1   (B8)

The sums over Omega in (B4), (B6), (B8) are contractions of the mask (or masked data) with the factors' rows over
all modes but n: out[i, p] = sum_j O_j prod_{k != n} B^(k)[j_k, p] with B^(k) the rows of S^(k) flattened to their
R(R+1)/2 upper-triangular entries (or the means, for B6), done with ``torch.einsum`` for all rows at once; the
R x R solves of (B5)-(B6) are one batched Cholesky. When every entry is observed all rows share one covariance
(C_i = Hadamard_{k != n} sum_j S^(k)_j), which is the cheaper ``BCPF.m`` path; both paths give the same numbers.

Lower bound (B9): the full variational bound L(q) = E[ln p(Y_Omega, Z, lambda, tau)] - E[ln q], i.e.
E ln p(Y|.) + sum_n E ln p(Z^(n)|lambda) + E ln p(lambda) + E ln p(tau) + H[q(Z)] + H[q(lambda)] + H[q(tau)]
(see ``_lower_bound``). Every update above maximises L in its block, so L never decreases while the rank is fixed
(a test checks this).

Starting rank. Without a ``max_rank`` the fit starts from R = max(I_1, ..., I_N) components, the reference's
default (``maxRank = max(size(Y))``; ``docs/algorithms.md#bcpf``), except for a matrix (N = 2), whose rank cannot
exceed min(I_1, I_2): it starts from min(I_1, I_2). ``default_max_rank`` is that rule; the ``ard`` selector uses it
for its own default too, so both plugins start from the same over-estimate (the ``bcpf`` recovery solver starts
from the rank its selector gives). ARD only removes components, so R must not be below the true rank. The cap for
matrices is measured, not taken from the paper (100 x 120 rank-3 matrices, SNR 20 dB, 4 seeds, 100 sweeps): with
85 % of the entries missing, 120 = max(dims) starting components ended at rank 2 on 3 seeds, 100 = min(dims) at
rank 3 on all; with 90 % missing both failed (from 100: ranks 1, 1, 1, 4) while 6 or 9 starting components gave
rank 3 on every seed (``tests/test_bcpf_ard.py``, the slow sweep): when few entries are observed, the more
components start, the more the shared prior shrinks the signal with them, so an over-estimate should not be
larger than needed.

Procedure: scale Y by s = std(Y_Omega) / N (as the reference); initialise Z^(n) = U_R S_R^(1/N) from the SVD of
the mode-n unfolding of Y with missing entries filled by the observed mean (N(0, 1) columns beyond the unfolding's
rank), V = I, E[lambda] = 1, E[tau] = 1; then per iteration: (B4)-(B6) mode by mode, the rebalancing step below,
(B7), (B8), the bound (B9); from the second iteration on drop components whose power sum_n ||m^(n)_{:r}||^2 is at
most ``prune_tol`` times the total power of all components. Stop after iteration t > 5 when
|L(t) - L(t-1)| / |L(2)| < tol (the reference's criterion on the lower bound) and, in addition, the largest relative
change of E[lambda_r] in that iteration is below ``lambda_tol`` and no component was pruned in it; or when the
caller's callback asks to; or after ``max_iters``. The estimate is s [[m^(1), ..., m^(N)]] and the rank is the
number of surviving components.

Rebalancing (``rebalance=True``, default). The fit does not see how a component's scale is split between the
modes, only the prior does, and the block updates move along that direction very slowly: after the first sweep a
component's norms typically differ by 10x between modes, and BCPF then spends hundreds of sweeps re-balancing them
(the bound keeps rising at a nearly constant rate, so the tol criterion does not fire within 100 sweeps, and split
components merge late). Scaling
column r of every factor n by c_nr > 0 with prod_n c_nr = 1 (m -> c m, V -> D V D) keeps q Gaussian, leaves [[m]]
and E||O * (Y - X)||^2 unchanged, and changes the bound by sum_r [sum_n I_n ln c_nr - 1/2 E[lambda_r] sum_n
c_nr^2 P_nr], P_nr = ||m^(n)_{:r}||^2 + sum_i V^(n)_{i,rr}. We maximise that exactly (``rebalance_scales``): an extra
coordinate-ascent step of the same bound, so L still never decreases and the fixed points are the same; it is not in
the paper or the reference, and ``rebalance=False`` gives the plain algorithm.

Other differences from the reference, all deliberate: (i) the scale s is the standard deviation of the observed
entries (the reference's formula also counts the zero-filled missing entries); (ii) the SVD initialisation uses
S^(1/N) instead of S^(1/2), which is the same for N = 2 and for N > 2 gives balanced factors of the right scale for
a rank-one tensor; (iii) the first sweep uses the full second moments m m^T + V of the initial factors (the
reference uses V only there); (iv) the pruning threshold is relative to the total component power (``prune_tol``,
default 1e-9; the reference's is machine epsilon at the scale of the factors); (v) the extra ``lambda_tol``
condition for stopping: without it the run stops while a superfluous component is still dying (its E[lambda_r]
still changing by a few % per sweep) and reports one component too many.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence
from typing import Literal, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

HYPER = 1e-6  # a0 = b0 = c0 = d0
_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 1 << 24  # largest intermediate of a masked contraction, in elements


@dataclasses.dataclass
class BCPFResult:
    """What ``bcpf`` returns. Arrays are numpy float64 in the data's original units."""

    estimate: np.ndarray  # posterior mean of the full tensor, s [[m^(1), ..., m^(N)]]
    rank: int  # number of surviving components
    history: list[dict[str, float]]  # per iteration: iteration, lower_bound, rel_change, lambda_change, fit, rank, tau
    factors: list[np.ndarray]  # posterior means m^(n) (I_n x rank), each multiplied by s^(1/N)
    lambdas: np.ndarray  # E[lambda_r] of the surviving components (scaled units)
    tau: float  # E[tau] in original units (1 / noise variance)
    converged: bool  # stopped by the lower-bound criterion (or by the callback)
    iterations: int
    scale: float  # s


def default_max_rank(shape: Sequence[int]) -> int:
    """The starting number of components when none is given: max(I_1, ..., I_N), the reference's default, or
    min(I_1, I_2) for a matrix (its largest possible rank). Shared by ``bcpf`` and the ``ard`` selector; see the
    module docstring."""
    dims = [int(d) for d in shape]
    return min(dims) if len(dims) == 2 else max(dims)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def _contract_others(weight: torch.Tensor, mats: Sequence[torch.Tensor | None], skip: int) -> torch.Tensor:
    """out[i, p] = sum over all indices j with j_skip = i of weight[j] * prod_{k != skip} mats[k][j_k, p].

    ``weight`` is the N-way mask (B4, B8) or masked data (B6); ``mats[k]`` is I_k x P. Chunked over P so that the
    largest intermediate stays below ``_CHUNK_ELEMENTS``; the largest other mode is contracted first.
    """
    import torch
    nd = weight.ndim
    others = sorted((k for k in range(nd) if k != skip), key=lambda k: -weight.shape[k])
    letters = string.ascii_letters[:nd]
    p = "Z"  # not among the first nd letters for nd <= 51
    spec = letters + "," + ",".join(letters[k] + p for k in others) + "->" + letters[skip] + p
    P = mats[others[0]].shape[1]
    inter = weight.numel() // weight.shape[others[0]]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, inter))
    if chunk >= P:
        return torch.einsum(spec, weight, *[mats[k] for k in others])
    parts = [
        torch.einsum(spec, weight, *[mats[k][:, start : start + chunk] for k in others]) for start in range(0, P, chunk)
    ]
    return torch.cat(parts, dim=1)


def cp_full(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[[Z^(1), ..., Z^(N)]]: the full tensor of a CP model with factors I_n x R."""
    import torch
    nd = len(factors)
    letters = string.ascii_letters[:nd]
    spec = ",".join(c + "Z" for c in letters) + "->" + letters
    return torch.einsum(spec, *factors)


def _second_moments(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """S_i = m_i m_i^T + V_i for every row: I x R x R."""
    return mean[:, :, None] * mean[:, None, :] + cov


def factor_update(
    n: int,
    data: torch.Tensor,
    mask: torch.Tensor | None,
    means: Sequence[torch.Tensor],
    covs: Sequence[torch.Tensor],
    tau: float,
    lambdas: torch.Tensor,
    masked_data: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The posterior of factor n given the others' moments, E[tau] and E[lambda]: equations (B4)-(B6).

    ``data`` is the (scaled) tensor with zeros where missing, ``mask`` a 0/1 float tensor or None (fully observed),
    ``means[k]`` I_k x R and ``covs[k]`` I_k x R x R. Returns (means_n, covs_n, C, logdet) where C is I_n x R x R
    (B4; for a fully observed tensor one R x R matrix shared by all rows) and logdet = sum_i ln det V_i.
    """
    import torch
    R = lambdas.numel()
    I_n = data.shape[n]
    others = [k for k in range(data.ndim) if k != n]
    eye = torch.eye(R, dtype=data.dtype, device=data.device)
    if mask is None:
        C = torch.ones(R, R, dtype=data.dtype, device=data.device)
        for k in others:
            C = C * (means[k].T @ means[k] + covs[k].sum(0))
        precision = tau * C + torch.diag(lambdas)
        chol = _cholesky(precision)
        cov = torch.cholesky_solve(eye, chol)
        rhs = _contract_others(data, means, n)  # I_n x R
        mean = tau * rhs @ cov
        logdet = -2.0 * I_n * torch.log(torch.diagonal(chol)).sum()
        return mean, cov.expand(I_n, R, R), C, logdet
    rows, cols = torch.triu_indices(R, R, device=data.device)
    packed: list[torch.Tensor | None] = [None] * data.ndim
    for k in others:
        packed[k] = _second_moments(means[k], covs[k])[:, rows, cols]
    C_packed = _contract_others(mask, packed, n)  # I_n x R(R+1)/2
    C = torch.zeros(I_n, R, R, dtype=data.dtype, device=data.device)
    C[:, rows, cols] = C_packed
    C[:, cols, rows] = C_packed
    precision = tau * C + torch.diag(lambdas)
    chol = _cholesky(precision)
    cov = torch.cholesky_solve(eye.expand(I_n, R, R), chol)
    weighted = masked_data if masked_data is not None else data * mask
    rhs = _contract_others(weighted, means, n)  # I_n x R
    mean = tau * (cov @ rhs[:, :, None]).squeeze(-1)
    logdet = -2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum()
    return mean, cov, C, logdet


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    import torch
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):  # a precision matrix is PD in exact arithmetic; add jitter if rounding says no
        scale = torch.diagonal(a, dim1=-2, dim2=-1).abs().amax(-1, keepdim=True)[..., None]
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        chol = torch.linalg.cholesky(a + 1e-12 * scale * eye)
    return chol


def _lower_bound(
    *, M: float, err: float, c: float, d: float, a: float, b: torch.Tensor, dims: Sequence[int],
    power_plus_var: torch.Tensor, logdet_total: float, R: int
) -> float:
    """The variational lower bound (B9), term by term; a and c are shape parameters, b and d rates."""
    from scipy.special import digamma, gammaln
    a0 = b0 = c0 = d0 = HYPER
    e_ln_tau = digamma(c) - math.log(d)
    e_tau = c / d
    b_np = b.detach().cpu().numpy()
    e_ln_lam = digamma(a) - np.log(b_np)
    e_lam = a / b_np
    sum_dims = float(sum(dims))
    pv = power_plus_var.detach().cpu().numpy()  # sum_n ||m_r||^2 + sum_i V_i,rr per component
    likelihood = -0.5 * M * _LOG_2PI + 0.5 * M * e_ln_tau - 0.5 * e_tau * err
    prior_z = -0.5 * R * sum_dims * _LOG_2PI + 0.5 * sum_dims * e_ln_lam.sum() - 0.5 * float((e_lam * pv).sum())
    prior_lam = float(np.sum(-gammaln(a0) + a0 * math.log(b0) + (a0 - 1.0) * e_ln_lam - b0 * e_lam))
    prior_tau = -gammaln(c0) + c0 * math.log(d0) + (c0 - 1.0) * e_ln_tau - d0 * e_tau
    entropy_z = 0.5 * logdet_total + 0.5 * R * sum_dims * (1.0 + _LOG_2PI)
    entropy_lam = float(np.sum(gammaln(a) - (a - 1.0) * digamma(a) - np.log(b_np) + a))
    entropy_tau = gammaln(c) - (c - 1.0) * digamma(c) - math.log(d) + c
    return float(likelihood + prior_z + prior_lam + prior_tau + entropy_z + entropy_lam + entropy_tau)


def rebalance_scales(
    means: list[torch.Tensor], covs: list[torch.Tensor], lambdas: torch.Tensor, dims: Sequence[int]
) -> float:
    """Rescale each component across modes to maximise the lower bound; returns the change of sum ln det V.

    Scaling column r of factor n by c_nr > 0 with prod_n c_nr = 1 (means m -> c m, covariances V -> D V D) leaves
    [[m]] and E||O * (Y - X)||^2 unchanged, and changes the bound by
        f(c) = sum_n I_n sum_r ln c_nr - 1/2 sum_r E[lambda_r] sum_n c_nr^2 P_nr,  P_nr = ||m_{:r}||^2 + sum_i V_i,rr.
    Its maximiser under the constraint is c_nr^2 = (I_n - mu_r) / (E[lambda_r] P_nr), mu_r chosen so that
    sum_n ln c_nr = 0 (found by bisection). This is an exact coordinate-ascent step in the scale directions, which
    the factor updates (B5)-(B6) explore only very slowly (a component whose norms differ a lot between modes stays
    unbalanced for hundreds of sweeps); a fixed point of BCPF is also a fixed point of this step.
    """
    import torch
    nd = len(means)
    P = torch.stack(
        [(means[n] ** 2).sum(0) + torch.diagonal(covs[n], dim1=-2, dim2=-1).sum(0) for n in range(nd)]
    )  # N x R
    # the scalar root finding is tiny (N x R numbers): numpy, on the host
    log_lp = np.log(np.maximum(lambdas.cpu().numpy()[None, :] * P.cpu().numpy(), 1e-300))  # ln(lambda_r P_nr)
    dims_np = np.asarray(dims, dtype=np.float64)[:, None]
    offset = dims_np - dims_np.min()  # I_n - I_min >= 0
    target = log_lp.sum(0)  # solve sum_n ln(offset_n + s) = target for s = I_min - mu > 0
    if offset.max() == 0.0:
        log_s = target / nd
    else:  # bisection on ln s: exp(target/N) - max offset <= s <= exp(target/N)
        log_hi = target / nd
        log_lo = np.log(np.maximum(np.exp(log_hi) - offset.max(), np.exp(log_hi) * 1e-300))
        for _ in range(80):
            log_mid = 0.5 * (log_lo + log_hi)
            too_big = np.log(offset + np.exp(log_mid)[None, :]).sum(0) > target
            log_hi = np.where(too_big, log_mid, log_hi)
            log_lo = np.where(too_big, log_lo, log_mid)
        log_s = 0.5 * (log_lo + log_hi)
    log_c = 0.5 * (np.log(offset + np.exp(log_s)[None, :]) - log_lp)  # N x R
    log_c = log_c - log_c.mean(0, keepdims=True)  # enforce prod_n c_nr = 1 exactly
    logdet_change = float(2.0 * (dims_np * log_c).sum())
    c = torch.as_tensor(np.exp(log_c), dtype=P.dtype, device=P.device)
    for n in range(nd):
        means[n] = means[n] * c[n]
        covs[n] = covs[n] * c[n][None, :, None] * c[n][None, None, :]
    return logdet_change


# ----------------------------------------------------------------------------------------------------------------
# the algorithm


def bcpf(
    data: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    *,
    max_rank: int | None = None,
    max_iters: int = 100,
    tol: float = 1e-5,
    prune_tol: float = 1e-9,
    init: Literal["svd", "random"] = "svd",
    seed: int = 0,
    device: str | torch.device = "cpu",
    lambda_tol: float = 1e-3,
    rebalance: bool = True,
    callback: Callable[[int, np.ndarray], bool] | None = None,
) -> BCPFResult:
    """Fit BCPF (variational Bayesian CP with ARD) to an N-way tensor with missing entries.

    Args:
        data: the tensor (N >= 2 modes); entries where ``mask`` is False are ignored (they may hold anything).
        mask: boolean (or 0/1) array of observed entries; None: every finite entry is observed.
        max_rank: the initial number of components R, an upper bound on the rank (None: ``default_max_rank``,
            max(data.shape) as the reference, min(data.shape) for a matrix).
        max_iters: at most this many sweeps of (B4)-(B8).
        tol: stop at iteration t > 5 when |L(t) - L(t-1)| / |L(2)| < tol (L: the lower bound B9) and ...
        lambda_tol: ... max_r |change of E[lambda_r]| / E[lambda_r] < lambda_tol, and nothing was pruned.
        prune_tol: drop component r once sum_n ||m^(n)_{:r}||^2 <= prune_tol * sum_r' (same), from iteration 2 on.
        init: "svd" (the reference's 'ml', U_R S_R^(1/N) of each mode unfolding) or "random" (N(0, 1) factors).
        seed: for the random columns/factors.
        device: torch device; all work is in float64 there.
        rebalance: add the exact scale-rebalancing step (see the module docstring); False gives plain BCPF.
        callback: called as callback(t, estimate) with t = 0 for the initialisation and t = 1, 2, ... after each
            sweep, ``estimate`` the current posterior-mean tensor in original units; returning True stops.

    Returns:
        ``BCPFResult`` (estimate, rank, per-iteration history, factors, ...).
    """
    import torch
    device = torch.device(device)
    dtype = torch.float64
    Y = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data, dtype=dtype).to(device)
    nd = Y.ndim
    if nd < 2:
        raise ValueError(f"bcpf needs a tensor with at least 2 modes, got shape {tuple(Y.shape)}")
    dims = list(Y.shape)
    finite = torch.isfinite(Y)
    if mask is None:
        O = None if bool(finite.all()) else finite.to(dtype)  # NaN/inf entries count as missing
    else:
        O = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).to(device)
        if O.shape != Y.shape:
            raise ValueError(f"mask shape {tuple(O.shape)} differs from data shape {tuple(Y.shape)}")
        O = (O != 0).to(dtype)
        if bool((~finite & (O != 0)).any()):
            raise ValueError("bcpf: the data has non-finite values at observed entries")
    if O is not None and bool((O == 1).all()):
        O = None  # fully observed: the shared-covariance path
    Y = torch.where(finite, Y, torch.zeros((), dtype=dtype, device=device))
    if O is not None:
        Y = Y * O
    M = float(O.sum()) if O is not None else float(Y.numel())
    if M == 0:
        raise ValueError("bcpf needs at least one observed entry")
    R = int(max_rank) if max_rank is not None else default_max_rank(dims)
    if R < 1:
        raise ValueError(f"max_rank must be >= 1, got {R}")

    # scale as the reference (std of the observed entries / N), undone at the end
    observed_values = Y[O != 0] if O is not None else Y.reshape(-1)
    mean_obs = observed_values.mean()
    scale = float(torch.sqrt(((observed_values - mean_obs) ** 2).mean())) / nd
    if not scale > 0.0 or not math.isfinite(scale):
        scale = float(observed_values.abs().max()) / nd or 1.0
    Y = Y / scale
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    means: list[torch.Tensor] = []
    if init == "svd":
        filled = Y if O is None else torch.where(O != 0, Y, mean_obs / scale)
        for n in range(nd):
            unfolding = torch.movedim(filled, n, 0).reshape(dims[n], -1)
            U, S, _ = torch.linalg.svd(unfolding, full_matrices=False)
            k = min(R, S.numel())
            Z = U[:, :k] * S[:k] ** (1.0 / nd)
            if k < R:
                extra = torch.randn(dims[n], R - k, generator=gen, dtype=dtype).to(device)
                Z = torch.cat([Z, extra], dim=1)
            means.append(Z)
    elif init == "random":
        means = [torch.randn(dims[n], R, generator=gen, dtype=dtype).to(device) for n in range(nd)]
    else:
        raise ValueError(f"unknown init {init!r} (expected 'svd' or 'random')")
    eye = torch.eye(R, dtype=dtype, device=device)
    covs = [eye.expand(dims[n], R, R).clone() for n in range(nd)]
    lambdas = torch.ones(R, dtype=dtype, device=device)
    tau = 1.0
    a0 = b0 = c0 = d0 = HYPER
    norm_y2 = float((Y * Y).sum())

    history: list[dict[str, float]] = []
    converged = False
    stopped = False
    if callback is not None:
        stopped = converged = bool(callback(0, (cp_full(means) * scale).cpu().numpy()))
    iterations = 0
    lb_ref: float | None = None  # |L(2)|
    X = cp_full(means)
    for t in range(1, max_iters + 1):
        if stopped:
            break
        iterations = t
        logdet_total = 0.0
        C_last = None
        for n in range(nd):
            means[n], covs[n], C_last, logdet = factor_update(n, Y, O, means, covs, tau, lambdas, masked_data=Y)
            logdet_total += float(logdet)
        X = cp_full(means)

        # (B8) sum over observed entries of E[x^2], from the last mode's C and second moments, and the error
        last = nd - 1
        if O is None:
            S_sum = means[last].T @ means[last] + covs[last].sum(0)
            ex2 = float((S_sum * C_last).sum())
        else:
            ex2 = float((_second_moments(means[last], covs[last]) * C_last).sum())
        cross = float((Y * X).sum())  # Y is zero where missing
        err = max(norm_y2 - 2.0 * cross + ex2, 0.0)

        if rebalance:
            logdet_total += rebalance_scales(means, covs, lambdas, dims)

        # (B7) component precisions
        power_plus_var = torch.zeros(R, dtype=dtype, device=device)
        for n in range(nd):
            power_plus_var = power_plus_var + (means[n] ** 2).sum(0) + torch.diagonal(covs[n], dim1=-2, dim2=-1).sum(0)
        a = a0 + 0.5 * sum(dims)
        b = b0 + 0.5 * power_plus_var
        lambda_change = float((torch.abs(a / b - lambdas) / (a / b)).max())
        lambdas = a / b

        # (B8) noise precision
        c = c0 + 0.5 * M
        d = d0 + 0.5 * err
        tau = c / d
        fit = 1.0 - math.sqrt(err) / math.sqrt(norm_y2) if norm_y2 > 0 else float("nan")

        lb = _lower_bound(
            M=M, err=err, c=c, d=d, a=a, b=b, dims=dims, power_plus_var=power_plus_var,
            logdet_total=logdet_total, R=R,
        )
        if t == 2:
            lb_ref = abs(lb) if lb != 0 else 1.0
        rel_change = (lb - history[-1]["lower_bound"]) / lb_ref if (history and lb_ref is not None) else float("nan")

        # prune components whose power is negligible (from the second iteration on)
        pruned = False
        power = sum((means[n] ** 2).sum(0) for n in range(nd))
        keep = power > prune_tol * power.sum()
        if t >= 2 and not bool(keep.all()):
            pruned = True
            idx = torch.nonzero(keep).flatten()
            means = [m[:, idx] for m in means]
            covs = [v[:, idx][:, :, idx] for v in covs]
            lambdas = lambdas[idx]
            R = int(idx.numel())
            X = cp_full(means) if R > 0 else torch.zeros_like(Y)

        history.append(
            {"iteration": t, "lower_bound": lb, "rel_change": rel_change, "fit": fit, "rank": R, "tau": tau / scale**2,
             "lambda_change": lambda_change}
        )
        if callback is not None and bool(callback(t, (X * scale).cpu().numpy())):
            converged = True
            break
        if R == 0:  # every component was switched off: the data look like pure noise to the model
            break
        if t > 5 and not pruned and abs(rel_change) < tol and lambda_change < lambda_tol:
            converged = True
            break

    estimate = (X * scale).cpu().numpy()
    root = scale ** (1.0 / nd)
    return BCPFResult(
        estimate=estimate,
        rank=R,
        history=history,
        factors=[(m * root).cpu().numpy() for m in means],
        lambdas=lambdas.cpu().numpy(),
        tau=tau / scale**2,
        converged=converged,
        iterations=iterations,
        scale=scale,
    )
