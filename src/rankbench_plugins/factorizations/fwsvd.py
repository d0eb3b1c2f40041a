"""``fwsvd``: Fisher-weighted SVD (``docs/algorithms.md#fwsvd``).

Hsu et al. (ICLR 2022), "Language Model Compression with Weighted Low-Rank Factorization".
Parameters whose perturbation changes the task loss more should be approximated better. With the empirical Fisher
I_ij = E[(∂L/∂W_ij)²] (here the per-batch gradients of the calibration loss, averaged over batches) the paper
sums it per output row, Ihat_i = Σ_j I_ij (``SiteStatistics.fisher_rows``), and solves the row-weighted problem

    min_{rank X <= k} || diag(sqrt(Ihat)) (W - X) ||_F

exactly by an SVD of the row-scaled weight:

    diag(sqrt(Ihat)) W = U diag(s) Vᵀ,     W_k = (diag(1/sqrt(Ihat)) U[:, :k]) diag(s[:k]) Vᵀ[:k].

Left = diag(1/sqrt(Ihat)) U, right = Vᵀ, and ``s`` is the spectrum of the row-weighted matrix.

Zero rows: a row whose Fisher sum is 0 (a dead output, or one the loss does not reach) would make the scaling
singular. Every row weight is therefore floored: Ihat_i <- Ihat_i + rel_floor * max_i Ihat_i (``rel_floor``,
default 1e-6, so such a row still counts with 1e-3 of the largest row's sqrt weight and the back-scaling
1/sqrt(Ihat) stays bounded). Adding the same constant to every row leaves a constant Fisher constant, so FWSVD
then equals plain SVD. If every row is 0 (no gradient at all) the weights are all 1: plain SVD.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.compression import Decomposition, LowRankFactorization, SiteStatistics


class FWSVD(LowRankFactorization):
    name = "fwsvd"
    version = "1"
    description = (
        "Fisher-weighted SVD: SVD of diag(sqrt(row Fisher sums)) W, row scale folded back into the left factor."
    )
    needs: ClassVar[frozenset[str]] = frozenset({"fisher_rows"})

    class Params(PluginParams):
        rel_floor: float = Field(
            1e-6, gt=0.0, description="added to every row's Fisher sum, relative to the largest (guards zero rows)"
        )

    def row_weights(self, stats: SiteStatistics, weight: torch.Tensor) -> torch.Tensor:
        """sqrt(Ihat) per output row, floored as described in the module docstring."""
        if stats.fisher_rows is None:
            raise ValueError("fwsvd needs the calibration statistic 'fisher_rows'")
        fisher = stats.fisher_rows.to(device=weight.device, dtype=weight.dtype).clamp_min(0)
        if fisher.shape != (weight.shape[0],):
            raise ValueError(f"fisher_rows has shape {tuple(fisher.shape)}, expected ({weight.shape[0]},)")
        top = fisher.max()
        if not torch.isfinite(top):
            raise ValueError("fisher_rows has non-finite values")
        if top <= 0:
            return torch.ones_like(fisher)
        return (fisher + self.params.rel_floor * top).sqrt()

    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:
        w = self.row_weights(stats, weight)
        U, s, Vh = torch.linalg.svd(w[:, None] * weight, full_matrices=False)
        zero = stats.fisher_rows is not None and not bool(stats.fisher_rows.max() > 0)
        note = "zero Fisher (no calibration gradient reached the site): plain SVD" if zero else ""
        return Decomposition(left=U / w[:, None], s=s, right=Vh, note=note)


@hookimpl
def rankbench_register_factorizations(register):
    register(FWSVD)
