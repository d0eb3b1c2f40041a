"""Shared helpers for the spectral selectors (``uniform``, ``energy``, ``effective-rank``, ``oht``, ``evbmf``).

A matrix site is answered with one int; a tensor site (``mode_singular_values`` set, ``singular_values`` None, or
more than two dimensions) with a tuple of ints, one per rank slot, each computed from that slot's spectrum. By
default the slots are the mode unfoldings: the mode-n unfolding of a tensor of shape (I_1, ..., I_N) is
I_n x prod_{j != n} I_j and its rank is capped at I_n; a site may name other matrices (``Site.rank_dims``, e.g. a
tensor train's sequential unfoldings) and caps (``Site.rank_caps``).

Parameter accounting for tensor sites: ``Site.params_at_ranks`` prices a rank tuple exactly; a site that only has
``params_at_rank`` (one int) is charged ``params_at_rank(max(ranks))``, see ``site_cost``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from rankbench.api import Site

Rank = int | tuple[int, ...]


def is_tensor(site: Site) -> bool:
    """True when the site is answered per mode."""
    if len(site.shape) != 2:
        return True
    return site.singular_values is None and site.mode_singular_values is not None


def clip_rank(k: float, hi: int) -> int:
    """``k`` as a Python int in [1, hi]."""
    return int(min(max(int(k), 1), int(hi)))


def unfolding_dims(shape: Sequence[int], mode: int) -> tuple[int, int]:
    """(rows, cols) of the mode-``mode`` unfolding of a tensor of ``shape``."""
    rows = int(shape[mode])
    return rows, int(math.prod(int(d) for d in shape)) // rows


def _as_spectrum(values, what: str) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError(f"{what}: empty spectrum")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: spectrum has non-finite values")
    # Singular values are non-negative and a selector reads them in descending order.
    return np.sort(np.abs(s))[::-1]


def site_spectra(site: Site) -> list[tuple[np.ndarray, tuple[int, int], int]]:
    """One ``(spectrum, (rows, cols), rank cap)`` per matrix site, or per mode of a tensor site."""
    if not is_tensor(site):
        if site.singular_values is None:
            raise ValueError(f"site {site.name!r} has no singular values")
        m, n = (int(d) for d in site.shape)
        return [(_as_spectrum(site.singular_values, f"site {site.name!r}"), (m, n), int(site.max_rank))]
    if site.mode_singular_values is None:
        raise ValueError(f"tensor site {site.name!r} has no mode_singular_values")
    dims, caps = slot_dims(site), slot_caps(site)
    if len(site.mode_singular_values) != len(dims):
        raise ValueError(
            f"tensor site {site.name!r}: {len(site.mode_singular_values)} spectra for {len(dims)} rank slots"
        )
    return [
        (_as_spectrum(s, f"site {site.name!r} slot {slot}"), dims[slot], caps[slot])
        for slot, s in enumerate(site.mode_singular_values)
    ]


def slot_dims(site: Site) -> list[tuple[int, int]]:
    """(rows, cols) of the matrix behind each rank slot of a tensor site (default: the mode unfoldings)."""
    if site.rank_dims is not None:
        return [(int(r), int(c)) for r, c in site.rank_dims]
    return [unfolding_dims(site.shape, mode) for mode in range(len(site.shape))]


def slot_caps(site: Site) -> list[int]:
    """Largest rank of each slot of a tensor site (default: the mode sizes)."""
    if site.rank_caps is not None:
        return [int(c) for c in site.rank_caps]
    return [int(d) for d in site.shape]


def per_site(site: Site, rule: Callable[[np.ndarray, tuple[int, int]], float]) -> Rank:
    """Apply ``rule(spectrum, (rows, cols)) -> k`` to a matrix site, or to every mode of a tensor site, and clip."""
    ranks = tuple(clip_rank(rule(s, dims), cap) for s, dims, cap in site_spectra(site))
    return ranks if is_tensor(site) else ranks[0]


def rank_limit(site: Site) -> int:
    """The largest single rank worth considering: ``max_rank`` for a matrix, the largest mode size for a tensor."""
    return max(slot_caps(site)) if is_tensor(site) else int(site.max_rank)


def broadcast_rank(site: Site, k: int) -> Rank:
    """The same rank ``k`` for a matrix site (clipped to [1, ``max_rank``]), or for every mode n of a tensor site
    (clipped to [1, I_n]; a tensor's ``max_rank`` does not bound per-mode ranks)."""
    if is_tensor(site):
        return tuple(clip_rank(k, cap) for cap in slot_caps(site))
    return clip_rank(k, site.max_rank)


def site_cost(site: Site, rank: Rank) -> int:
    """Parameters stored by the site at ``rank``: exact for a rank tuple where the site prices tuples
    (``params_at_ranks``), else charged at the largest slot rank (see module doc)."""
    if isinstance(rank, tuple) and site.params_at_ranks is not None:
        return int(site.params_at_ranks(tuple(int(r) for r in rank)))
    if site.params_at_rank is None:
        raise ValueError(f"site {site.name!r} has no params_at_rank: a parameter budget cannot be applied")
    k = max(rank) if isinstance(rank, tuple) else rank
    return int(site.params_at_rank(int(k)))


def largest_fitting(cost: Callable[[int], float], limit: float, hi: int) -> int:
    """Largest k in [1, hi] with ``cost(k) <= limit`` for a non-decreasing ``cost``; 0 when even k = 1 does not fit."""
    if hi < 1 or cost(1) > limit:
        return 0
    lo = 1  # cost(lo) <= limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def energy_fractions(s: np.ndarray) -> np.ndarray:
    """Cumulative energy fractions c_k = sum_{i<=k} s_i^2 / sum_i s_i^2 (c[k-1] for rank k); c[-1] is exactly 1."""
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if e[-1] <= 0:
        return np.ones_like(e)
    c = e / e[-1]
    c[-1] = 1.0
    return c


def energy_rank(c: np.ndarray, eta: float) -> int:
    """k(eta) = min{k : c_k >= eta} from cumulative fractions ``c`` (k = 1 for eta <= c_1)."""
    return min(int(np.searchsorted(c, eta, side="left")) + 1, len(c))


def round_half_up(x: float) -> int:
    """Nearest integer, halves rounded up (2.5 -> 3), unlike Python's ``round`` (banker's rounding)."""
    return int(math.floor(x + 0.5))
