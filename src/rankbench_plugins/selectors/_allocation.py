"""Shared budget machinery of the data-aware selectors (``welore``, ``sensitivity``, ``adalora``, ``sublora``).

Contents
--------
``param_limit``        the parameter budget rho * sum dense of a ``param_ratio`` problem.
``budgeted_greedy``    greedy selection of singular components under a parameter budget, for a set function whose
                       marginal gains are linear-plus-pairwise (first-order Taylor scores; SubLoRA's quadratic
                       objective). Lazy evaluation (Minoux's accelerated greedy) is exact when gains never increase,
                       which holds for the submodular objectives it is used with (pairwise terms M_ij >= 0).
``selection_answer``   the selector's answer for a set of selected components: exactly those (``Components``).
``submodular_value``   F(S) of the SubLoRA objective, for checks.
``strs_search``        ASVD's sensitivity-based truncation rank search (STRS) over a (site, ratio, ppl) table.
``ratio_rank``         the rank that a parameter ratio gives a site (largest k with params_at_rank(k) <= ratio*dense).
``memo``               a selector-side memo shared by all cells that see the same decompositions (see its doc).
``rank_total_limit``   the component budget (floor of the total rank) of a ``rank_total`` problem (adaptation).
``budget_schedule``    AdaLoRA's cubic budget schedule b(t) (PEFT's ``RankAllocator.budget_schedule``).
``schedule_steps``     (tinit, tfinal, last determination step) of that schedule from fractions of the total steps.
``kind_budget_skip``   skip reason for a task whose (problem kind, budget kind) pair a two-kind selector cannot read.

Rank semantics. An int rank keeps the *leading* k components of a site's decomposition; the compression protocol
also takes ``Components`` (``rankbench.kinds.compression``), the exact set of components to keep. A greedy that
selects arbitrary components ("free" mode) answers with exactly the components it selected (``selection_answer``),
so the set it scored is the set the task keeps; "prefix" mode only lets component i of a site be selected after
component i-1 (its answer is a prefix as well).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from rankbench.api import ADAPTATION, COMPRESSION, PARAM_RATIO, RANK_TOTAL, RankProblem, Site
from rankbench.kinds.compression import Components
from rankbench_plugins.selectors._spectral import largest_fitting

# --------------------------------------------------------------------------------------------------------------
# Budget


def param_limit(problem: RankProblem, who: str) -> float:
    """rho * sum of the sites' dense parameters; raises unless the problem has a ``param_ratio`` budget."""
    if problem.budget_kind != PARAM_RATIO or problem.budget is None:
        raise ValueError(f"{who} needs a budget of kind {PARAM_RATIO!r}, got {problem.budget_kind!r}")
    return float(problem.budget) * problem.dense_params


def rank_total_limit(problem: RankProblem, who: str) -> int:
    """floor(budget) components in total; raises unless the problem has a ``rank_total`` budget."""
    if problem.budget_kind != RANK_TOTAL or problem.budget is None:
        raise ValueError(f"{who} needs a budget of kind {RANK_TOTAL!r} for adaptation, got {problem.budget_kind!r}")
    return max(0, int(math.floor(float(problem.budget))))


#: the budget kind each problem kind is read with by the selectors that handle both kinds (sublora)
KIND_BUDGETS = {COMPRESSION: PARAM_RATIO, ADAPTATION: RANK_TOTAL}


def needs_svd_form(selector, factorization) -> str | None:
    """Skip reason for a compression factorization that offers no SVD-form ``decomposition`` (tensor formats)."""
    from rankbench.kinds.compression import LowRankFactorization

    if COMPRESSION in factorization.problem_kinds and not isinstance(factorization, LowRankFactorization):
        return f"selector {selector.name} needs an SVD-form decomposition, which {factorization.name} does not offer"
    return None


def kind_budget_skip(selector, task) -> str | None:
    """Skip reason for a task whose (problem kind, budget kind) pair is not one of ``KIND_BUDGETS``, else None."""
    kind, budget_kind = getattr(task, "problem_kind", None), getattr(task, "budget_kind", None)
    expected = KIND_BUDGETS.get(kind)
    if expected is not None and budget_kind != expected:
        return f"selector {selector.name} reads {kind} problems with budget kind {expected}, not {budget_kind}"
    return None


def budget_schedule(
    step: int, total_steps: int, init_budget: int, target_budget: int, tinit: int, tfinal: int
) -> int:
    """AdaLoRA's budget b(t) (Zhang et al. 2023, Eq. 12; PEFT's ``RankAllocator.budget_schedule``):

        b(t) = init_budget                                                        t <= tinit
             = target_budget                                                      t >  T - tfinal
             = int((init_budget - target_budget) (1 - (t - tinit) / (T - tfinal - tinit))^3 + target_budget)  else

    with T = ``total_steps``. The middle branch is only reached when tinit < t <= T - tfinal (so its denominator is
    positive), and it gives exactly ``target_budget`` at t = T - tfinal."""
    if step <= tinit:
        return int(init_budget)
    if step > total_steps - tfinal:
        return int(target_budget)
    mul = 1.0 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * mul**3 + target_budget)


def schedule_steps(total_steps: int, tinit_fraction: float, tfinal_fraction: float) -> tuple[int, int, int]:
    """(tinit, tfinal, t_end) in steps: tinit = round(tinit_fraction T), tfinal = round(tfinal_fraction T) (halves
    rounded up), and t_end = T - tfinal clipped to [1, T] (0 when T = 0): the step of the final rank determination,
    after which the masks stay fixed for the remaining T - t_end steps."""
    T = max(0, int(total_steps))
    tinit = int(math.floor(tinit_fraction * T + 0.5))
    tfinal = int(math.floor(tfinal_fraction * T + 0.5))
    t_end = min(T, max(1, T - tfinal)) if T else 0
    return tinit, tfinal, t_end


def site_params(site: Site, k: int) -> int:
    if site.params_at_rank is None:
        raise ValueError(f"site {site.name!r} has no params_at_rank: a parameter budget cannot be applied")
    return int(site.params_at_rank(int(k)))


def total_params(problem: RankProblem, ranks: dict[str, int]) -> int:
    return sum(site_params(site, ranks[site.name]) for site in problem.sites)


def ratio_rank(site: Site, ratio: float) -> int:
    """Largest k in [1, max_rank] with params_at_rank(k) <= ratio * dense_params (1 when even k = 1 does not)."""
    k = largest_fitting(lambda r: site_params(site, r), float(ratio) * site.dense_params, int(site.max_rank))
    return max(k, 1)


def ones(problem: RankProblem) -> dict[str, int]:
    return {site.name: 1 for site in problem.sites}


# --------------------------------------------------------------------------------------------------------------
# Budgeted greedy over components


def budgeted_greedy(
    linear: np.ndarray,
    groups: np.ndarray,
    costs: Sequence[Callable[[int], int]],
    limit: float,
    *,
    blocks: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    pred: np.ndarray | None = None,
    forced: Sequence[int] = (),
    ratio: bool = True,
    fill: bool = True,
) -> tuple[list[int], float]:
    """Greedy maximisation of F(S) = sum over the steps of the marginal gains, under a parameter budget.

    Items are components i = 0..n-1; ``groups[i]`` is the site of component i, and keeping k components of site g
    costs ``costs[g](k)`` parameters (non-decreasing increments, e.g. k(m+n)). With T the items not selected
    (initially all), the marginal gain of selecting i is

        gain_i(T) = linear[i] + sum_{j in T, j != i, j in block(i)} M_ij

    where ``blocks`` is a list of ``(indices, M)`` (M symmetric over those indices, its diagonal ignored; an item in
    at most one block; no pairwise terms across blocks). With linear_i = -c_i + M_ii/2 this is SubLoRA's
    h(T) - h(T \\ {i}) (see ``sublora``); with no blocks F is modular (linear_i is then a fixed score).

    Each step picks, among the items whose next parameter increment still fits, the best ``gain / increment``
    (``ratio=True``: the cost-benefit greedy) or the best ``gain`` (``ratio=False``: the unit-cost greedy); ties go
    to the lower index. ``pred[i]`` (>= 0) makes item i selectable only once item ``pred[i]`` is selected (prefix
    mode). ``forced`` items are selected first, in order, whatever their gain or cost. Without ``fill`` the greedy
    stops at the first non-positive best gain; with it, it goes on until no increment fits.

    Lazy evaluation: scores in the heap are upper bounds as long as gains never increase (every M_ij >= 0) and
    increments never decrease; a popped item is re-scored and taken only if it still beats the next bound.

    Returns (selected items in order, F(S) = the sum of the gains at selection).
    """
    linear = np.asarray(linear, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    n = len(linear)
    block_of = np.full(n, -1, dtype=np.int64)
    local = np.zeros(n, dtype=np.int64)
    mats, rows = [], []
    for b, (idx, M) in enumerate(blocks):
        idx = np.asarray(idx, dtype=np.int64)
        M = np.array(M, dtype=np.float64, copy=True)
        np.fill_diagonal(M, 0.0)
        if np.any(block_of[idx] >= 0):
            raise ValueError("an item is in more than one block")
        block_of[idx] = b
        local[idx] = np.arange(len(idx))
        mats.append(M)
        rows.append(M.sum(axis=1))  # r_i = sum_{j in T, j != i} M_ij with T = everything
    counts = np.zeros(len(costs), dtype=np.int64)
    spent = float(sum(int(cost(0)) for cost in costs))
    taken = np.zeros(n, dtype=bool)

    def gain(i: int) -> float:
        b = block_of[i]
        return float(linear[i] + (rows[b][local[i]] if b >= 0 else 0.0))

    def increment(i: int) -> int:
        g = groups[i]
        return int(costs[g](int(counts[g]) + 1)) - int(costs[g](int(counts[g])))

    def score(i: int) -> float:
        value = gain(i)
        return value / max(increment(i), 1) if ratio else value

    def take(i: int) -> float:
        nonlocal spent
        value = gain(i)
        spent += increment(i)
        counts[groups[i]] += 1
        taken[i] = True
        b = block_of[i]
        if b >= 0:
            rows[b] -= mats[b][:, local[i]]
        return value

    value = 0.0
    chosen: list[int] = []
    for i in forced:
        if not taken[i]:
            value += take(int(i))
            chosen.append(int(i))

    def available(i: int) -> bool:
        return not taken[i] and (pred is None or pred[i] < 0 or taken[pred[i]])

    heap = [(-score(i), i) for i in range(n) if available(i)]
    heapq.heapify(heap)
    waiting: dict[int, list[int]] = {}  # prefix mode: predecessor -> items it unlocks
    if pred is not None:
        for i in range(n):
            if pred[i] >= 0 and not taken[i] and not taken[pred[i]]:
                waiting.setdefault(int(pred[i]), []).append(i)
    while heap:
        _, i = heapq.heappop(heap)
        if taken[i]:
            continue
        if spent + increment(i) > limit:
            continue  # increments never decrease: it will not fit later either
        fresh = score(i)
        if heap and (-fresh, i) > heap[0]:
            heapq.heappush(heap, (-fresh, i))  # stale bound: re-queue with the current score
            continue
        if not fill and gain(i) <= 0:
            break
        value += take(i)
        chosen.append(i)
        for j in waiting.pop(i, ()):
            heapq.heappush(heap, (-score(j), j))
    return chosen, value


def component_layout(problem: RankProblem, lengths: list[int]):
    """groups, predecessor (prefix mode) and the index of each site's first component, for concatenated components."""
    groups = np.concatenate([np.full(n, g, dtype=np.int64) for g, n in enumerate(lengths)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pred = np.arange(len(groups), dtype=np.int64) - 1
    pred[starts] = -1
    return groups, pred, starts


def ranks_from_selection(problem: RankProblem, groups: np.ndarray, chosen: list[int]) -> dict[str, int]:
    """The number of components selected per site (at least 1, at most ``max_rank``)."""
    counts = np.bincount(groups[chosen], minlength=len(problem.sites)) if chosen else np.zeros(len(problem.sites))
    return {site.name: max(1, min(int(counts[g]), int(site.max_rank))) for g, site in enumerate(problem.sites)}


def selection_answer(problem: RankProblem, groups: np.ndarray, chosen: list[int]) -> dict[str, Components]:
    """Exactly the selected components of every site (``Components``; local indices within the site), so that the
    compression protocol keeps the set the selector scored. A site with none selected keeps its leading component."""
    groups = np.asarray(groups, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1]) if len(groups) else np.zeros(0, np.int64)
    first = {int(groups[s]): int(s) for s in starts}
    local: dict[int, list[int]] = {g: [] for g in range(len(problem.sites))}
    for i in chosen:
        g = int(groups[i])
        local[g].append(int(i) - first[g])
    return {site.name: Components(tuple(local[g]) or (0,)) for g, site in enumerate(problem.sites)}


def submodular_value(selected: Sequence[int], c: np.ndarray, M: np.ndarray) -> float:
    """F(S) = h([n]) - h([n] \\ S) with h(T) = -sum_{i in T} c_i + 1/2 sum_{i,j in T} M_ij (dense M; for checks)."""
    c = np.asarray(c, dtype=np.float64)
    M = np.asarray(M, dtype=np.float64)

    def h(mask: np.ndarray) -> float:
        return float(-c[mask].sum() + 0.5 * M[np.ix_(mask, mask)].sum())

    everything = np.ones(len(c), dtype=bool)
    rest = everything.copy()
    rest[list(selected)] = False
    return h(everything) - h(rest)


def project_submodular(M: np.ndarray) -> np.ndarray:
    """The Frobenius-nearest matrix with non-negative off-diagonal entries: M_ij := max(M_ij, 0) for i != j.

    The constraint set is a product of one interval per entry (diagonal free, off-diagonal [0, inf)), so the
    Euclidean projection acts entry by entry; the input is first symmetrised (Hessian round-off)."""
    M = 0.5 * (np.asarray(M, dtype=np.float64) + np.asarray(M, dtype=np.float64).T)
    P = np.maximum(M, 0.0)
    np.fill_diagonal(P, np.diag(M))
    return P


# --------------------------------------------------------------------------------------------------------------
# STRS (ASVD)


def strs_search(
    table: Sequence[tuple[int, float, float]],
    sites: Sequence[Site],
    limit: float,
    default_ratio: float = 1.0,
) -> tuple[dict[str, int], int]:
    """ASVD's sensitivity-based truncation rank search.

    ``table`` holds (site index, ratio, ppl). Sorted by ppl descending (ties: site index, then ratio), a cut index
    c splits it into a head [0, c) and a tail [c, N); every site takes the smallest ratio among its tail entries
    (``default_ratio`` when it has none) and the rank that ratio gives (``ratio_rank``). Moving c right removes
    tail entries, so ratios, ranks and the parameter total never decrease with c; a binary search finds the largest
    c whose total fits ``limit``. Returns (ranks, c); when even c = 0 does not fit, every site gets rank 1 and c = -1.
    """
    order = sorted(table, key=lambda e: (-e[2], e[0], e[1]))

    def ranks_at(cut: int) -> dict[str, int]:
        best = [default_ratio] * len(sites)
        for site_index, ratio, _ppl in order[cut:]:
            best[site_index] = min(best[site_index], ratio)
        return {site.name: ratio_rank(site, best[s]) for s, site in enumerate(sites)}

    def fits(cut: int) -> bool:
        ranks = ranks_at(cut)
        return sum(site_params(site, ranks[site.name]) for site in sites) <= limit

    if not fits(0):
        return {site.name: 1 for site in sites}, -1
    lo, hi = 0, len(order)  # fits(lo); find the largest fitting cut
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return ranks_at(lo), lo


# --------------------------------------------------------------------------------------------------------------
# Selector-side memo


def memo(problem: RankProblem, key: Hashable, compute: Callable[[], Any]) -> Any:
    """Memoise ``compute()`` for every cell of the same task configuration and factorization (every budget, every
    selector) in the compression kind's selector store (``problem.stats.store()``), which lives exactly as long as
    that factorization's decompositions in this worker process. Keyed by ``key`` and the sites' names."""
    store = problem.stats.store()
    full_key = (key, tuple(site.name for site in problem.sites))
    if full_key not in store:
        store[full_key] = compute()
    return store[full_key]
