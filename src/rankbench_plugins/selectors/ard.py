"""``ard``: rank by Bayesian automatic relevance determination, i.e. the number of components that survive BCPF.

Paper: Q. Zhao, L. Zhang and A. Cichocki, "Bayesian CP Factorization of Incomplete Tensors with Automatic Rank
Determination", IEEE TPAMI 37(9):1751-1763, 2015 (``docs/algorithms.md#bcpf``). The model, the variational updates
(B4)-(B8), the lower bound (B9) and the pruning rule are written out in ``rankbench.kinds.bcpf_core``, whose
``bcpf`` function this selector runs: y_i = sum_r prod_n z^(n)_{i_n r} + noise on the observed entries, with one
Gamma-distributed precision lambda_r per component shared by all modes (the ARD prior). Components whose power
falls to (relatively) zero are removed; the rank is the number left.

For a site with ``data`` (and optionally ``mask``, True where observed): BCPF on the site's data, a 2-way fit
(Bayesian matrix factorisation with ARD) for a matrix site and an N-way CP fit for a tensor site, starting from
``max_rank`` components (None: ``bcpf_core.default_max_rank``, the same default as ``bcpf`` itself: max(site.shape),
the reference's default, for a tensor site and min(site.shape), the largest possible rank, for a matrix site;
version 1 started from min(site.shape) for tensor sites too). The answer is an int for a matrix site and, for a tensor site, a
tuple repeating that number once per mode (a CP rank is one number for all modes). At least 1: if every component
is switched off (the data look like pure noise to the model) the selector answers 1, as the other selectors do.

Budget-free. A site without ``data`` (a network weight whose task does not pass it) is an error, not a silent
fallback to another rule: the task has to hand the matrix or tensor to fit as ``Site.data``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from rankbench.api import ADAPTATION, RECOVERY, PluginParams, RankProblem, Ranks, Selector, Site, hookimpl
from rankbench.kinds.bcpf_core import bcpf, default_max_rank


class ARDSelector(Selector):
    name = "ard"
    version = "2"
    description = (
        "Bayesian ARD (BCPF, Zhao et al. TPAMI 2015): fits a CP / matrix factorisation with one shared precision per "
        "component to the site's (observed) data and returns the number of components that survive."
    )

    # Tasks of these kinds pass ``Site.data`` (the observations; an adapter's learned update); compression does not.
    problem_kinds: ClassVar[frozenset[str]] = frozenset({RECOVERY, ADAPTATION})

    class Params(PluginParams):
        max_rank: int | None = Field(
            None, ge=1,
            description="initial number of components (None: bcpf_core.default_max_rank, max(shape) for a tensor, "
            "min(shape) for a matrix)",
        )
        max_iters: int = Field(100, ge=1, description="at most this many BCPF sweeps")
        tol: float = Field(1e-5, gt=0.0, description="relative change of the lower bound at which BCPF stops")
        prune_tol: float = Field(1e-9, gt=0.0, lt=1.0, description="relative power below which a component is dropped")

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def site_rank(self, site: Site, seed: int = 0, device: str = "cpu") -> int:
        """The number of components BCPF keeps on ``site.data`` (at least 1)."""
        if site.data is None:
            raise ValueError(
                f"ard needs the site's data: site {site.name!r} has no `data` (pass the matrix or tensor to fit, e.g. "
                "the weight itself, as Site.data; ard does not fall back to another rule)"
            )
        data = np.asarray(site.data, dtype=np.float64)
        if data.ndim < 2:
            raise ValueError(f"ard needs a matrix or tensor site, site {site.name!r} has data of shape {data.shape}")
        mask = None if site.mask is None else np.asarray(site.mask, dtype=bool)
        max_rank = self.params.max_rank if self.params.max_rank is not None else default_max_rank(data.shape)
        result = bcpf(
            data,
            mask,
            max_rank=max_rank,
            max_iters=self.params.max_iters,
            tol=self.params.tol,
            prune_tol=self.params.prune_tol,
            seed=seed,
            device=device,
        )
        return max(int(result.rank), 1)

    def select(self, problem: RankProblem) -> Ranks:
        ranks: dict[str, int | tuple[int, ...]] = {}
        for site in problem.sites:
            k = self.site_rank(site, seed=problem.seed, device=problem.device)
            ndim = np.ndim(site.data)
            ranks[site.name] = k if ndim == 2 else (k,) * ndim
        return ranks


@hookimpl
def rankbench_register_selectors(register):
    register(ARDSelector)
