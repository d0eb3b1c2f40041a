"""``fwsvd``: Fisher-weighted SVD (``docs/algorithms.md#fwsvd``).

Hsu et al. (ICLR 2022), "Language Model Compression with Weighted Low-Rank Factorization".
Parameters whose perturbation changes the task loss more should be approximated better. With the empirical Fisher
I_ij = E[(∂L/∂W_ij)²] of a weight W (out x in, PyTorch's layout; here the per-batch gradients of the calibration
loss, averaged over batches) the paper assumes that the entries of one row of *its* weight matrix share one
importance, sums the Fisher along that row and solves the row-weighted problem exactly by an SVD. Which axis of a
PyTorch weight that row is depends on the paper's layout of a linear layer, so the axis is a parameter:

* ``axis: in`` (default): one weight per input channel, Ihat_j = Σ_i I_ij (``SiteStatistics.fisher_cols``), and

      min_{rank X <= k} || (W - X) diag(sqrt(Ihat)) ||_F,   W diag(sqrt(Ihat)) = U diag(s) Vᵀ,
      W_k = U[:, :k] diag(s[:k]) (Vᵀ[:k] diag(1/sqrt(Ihat))):    left = U, right = Vᵀ diag(1/sqrt(Ihat));

* ``axis: out``: one weight per output row, Ihat_i = Σ_j I_ij (``SiteStatistics.fisher_rows``), and

      min_{rank X <= k} || diag(sqrt(Ihat)) (W - X) ||_F,   diag(sqrt(Ihat)) W = U diag(s) Vᵀ,
      W_k = (diag(1/sqrt(Ihat)) U[:, :k]) diag(s[:k]) Vᵀ[:k]:    left = diag(1/sqrt(Ihat)) U, right = Vᵀ.

``s`` is the spectrum of the weighted matrix in both cases. The paper's own text on the layout could not be read
here (**unverified**). The default is ``in`` because most public ports read the paper's row as an input channel:
Zishan-Shao/FlashSVD (``src/fwsvd.py``, ``compute_row_sum_svd_decomposition``) and a LoMa port
(``fisher_weighted_svd``) transpose PyTorch's out x in weight to in x out (the y = x W layout) before summing the
Fisher over each row, and ASVD's Fisher option likewise scales input columns; at least one other port weights
output rows. ``axis: out`` is this plugin's version-1 behaviour.

Zero weights: a row or column whose Fisher sum is 0 (a dead channel, or one the loss does not reach) would make the
scaling singular. Every weight is therefore floored: Ihat <- Ihat + rel_floor * max Ihat (``rel_floor``, default
1e-6, so such a channel still counts with 1e-3 of the largest one's sqrt weight and the back-scaling 1/sqrt(Ihat)
stays bounded). Adding the same constant to every weight leaves a constant Fisher constant, so FWSVD then equals
plain SVD. If every weight is 0 (no gradient at all) the weights are all 1: plain SVD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.compression import Decomposition, LowRankFactorization, SiteStatistics, thin_svd

if TYPE_CHECKING:
    import torch

STATISTIC = {"in": "fisher_cols", "out": "fisher_rows"}


class FWSVD(LowRankFactorization):
    name = "fwsvd"
    version = "2"
    description = (
        "Fisher-weighted SVD: SVD of the weight scaled by sqrt(Fisher sums) per input channel (axis in) or output row"
        " (axis out), the scale folded back into the factor on that side."
    )
    needs: ClassVar[frozenset[str]] = frozenset({STATISTIC["in"]})  # of the default axis; instances: their axis's

    class Params(PluginParams):
        axis: Literal["in", "out"] = Field(
            "in", description="the Fisher sums weight input channels (in) or output rows (out)"
        )
        rel_floor: float = Field(
            1e-6, gt=0.0, description="added to every channel's Fisher sum, relative to the largest (guards zeros)"
        )

    def __init__(self, params: PluginParams | None = None):
        super().__init__(params)
        self.needs = frozenset({STATISTIC[self.params.axis]})

    def fisher(self, stats: SiteStatistics) -> torch.Tensor | None:
        return getattr(stats, STATISTIC[self.params.axis])

    def channel_weights(self, stats: SiteStatistics, weight: torch.Tensor) -> torch.Tensor:
        """sqrt(Ihat) per channel of ``axis`` (out: rows, in: columns), floored as in the module docstring."""
        import torch

        kind = STATISTIC[self.params.axis]
        size = weight.shape[0] if self.params.axis == "out" else weight.shape[1]
        fisher = self.fisher(stats)
        if fisher is None:
            raise ValueError(f"fwsvd with axis {self.params.axis} needs the calibration statistic {kind!r}")
        fisher = fisher.to(device=weight.device, dtype=weight.dtype).clamp_min(0)
        if fisher.shape != (size,):
            raise ValueError(f"{kind} has shape {tuple(fisher.shape)}, expected ({size},)")
        top = fisher.max()
        if not torch.isfinite(top):
            raise ValueError(f"{kind} has non-finite values")
        if top <= 0:
            return torch.ones_like(fisher)
        return (fisher + self.params.rel_floor * top).sqrt()

    def row_weights(self, stats: SiteStatistics, weight: torch.Tensor) -> torch.Tensor:
        """``channel_weights`` (the name of version 1, where the channels were the output rows)."""
        return self.channel_weights(stats, weight)

    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:

        w = self.channel_weights(stats, weight)
        fisher = self.fisher(stats)
        zero = fisher is not None and not bool(fisher.max() > 0)
        note = "zero Fisher (no calibration gradient reached the site): plain SVD" if zero else ""
        if self.params.axis == "out":
            U, s, Vh = thin_svd(w[:, None] * weight)
            return Decomposition(left=U / w[:, None], s=s, right=Vh, note=note)
        U, s, Vh = thin_svd(weight * w[None, :])
        return Decomposition(left=U, s=s, right=Vh / w[None, :], note=note)


@hookimpl
def rankbench_register_factorizations(register):
    register(FWSVD)
