"""``asvd``: activation-aware SVD (``docs/algorithms.md#asvd``).

Yuan et al. (2023), "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language Models"
(arXiv 2312.05821). Input channels that carry large activations matter more, so the weight is scaled by a
per-input-channel factor before truncation and the scale is folded back into the right factor:

    S_j   = (mean over calibration tokens of |x_j|)^alpha + eps          (alpha = 0.5, eps = 1e-6 by default)
    W diag(S) = U diag(s) Vᵀ
    W_k   = U[:, :k] diag(s[:k]) (Vᵀ[:k] diag(1/S))

so W_k minimises ||(W - X) diag(S)||_F over rank-k X, and ``s`` (the spectrum a selector sees) is that of
W diag(S). At full rank W is reproduced exactly.

Differences from the reference code: it uses a randomized ``svd_lowrank`` of rank k per target rank; this plugin
takes the exact thin SVD once (so every rank is served by one decomposition and the result is deterministic).
ASVD's per-layer sensitivity search for ranks is a selector (``sensitivity``), not part of this factorization.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.compression import Decomposition, LowRankFactorization, SiteStatistics

if TYPE_CHECKING:
    import torch


class ASVD(LowRankFactorization):
    name = "asvd"
    version = "1"
    description = "Activation-aware SVD: SVD of W diag(mean|x|^alpha + eps), scale folded back into the right factor."
    needs: ClassVar[frozenset[str]] = frozenset({"input_abs_mean"})
    precision: ClassVar[str] = "float32"  # spectrum within 1e-5 (norm-wise) of float64 on SmolLM2 (tests)

    class Params(PluginParams):
        alpha: float = Field(0.5, ge=0.0, description="exponent of the mean absolute activation")
        eps: float = Field(1e-6, gt=0.0, description="added to every channel scale (keeps dead channels invertible)")

    def scales(self, stats: SiteStatistics, weight: torch.Tensor) -> torch.Tensor:
        """S: one positive scale per input channel."""
        if stats.input_abs_mean is None:
            raise ValueError("asvd needs the calibration statistic 'input_abs_mean'")
        mean_abs = stats.input_abs_mean.to(device=weight.device, dtype=weight.dtype)
        if mean_abs.shape != (weight.shape[1],):
            raise ValueError(f"input_abs_mean has shape {tuple(mean_abs.shape)}, expected ({weight.shape[1]},)")
        return mean_abs.clamp_min(0) ** self.params.alpha + self.params.eps

    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:
        import torch

        S = self.scales(stats, weight)
        U, s, Vh = torch.linalg.svd(weight * S, full_matrices=False)
        return Decomposition(left=U, s=s, right=Vh / S)


@hookimpl
def rankbench_register_factorizations(register):
    register(ASVD)
