"""``svd``: plain truncated SVD of the weight (``docs/algorithms.md#parameter-ratio-rule``).

Eckart & Young (1936), "The approximation of one matrix by another of lower rank": with W = U diag(s) Vᵀ
(s descending), the rank-k truncation

    W_k = U[:, :k] diag(s[:k]) Vᵀ[:k]

minimises ||W - X||_F (and ||W - X||_2) over all X of rank <= k, with ||W - W_k||_F² = Σ_{i>k} s_i².
The decomposition is left = U, s, right = Vᵀ (exact thin SVD, no calibration data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rankbench.api import COMPRESSION, TRAINING, PluginParams, hookimpl
from rankbench.kinds.compression import Decomposition, LowRankFactorization, SiteStatistics

if TYPE_CHECKING:
    import torch


class SVD(LowRankFactorization):
    name = "svd"
    version = "1"
    description = "Truncated SVD of the weight (Eckart-Young optimal in Frobenius norm); data-free."
    needs: ClassVar[frozenset[str]] = frozenset()
    precision: ClassVar[str] = "float32"  # spectrum within 1e-5 (norm-wise) of float64 on SmolLM2 (tests)
    # training: the matrix format (U S V^T) that DLRT trains in (``rankbench.kinds.training``)
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION, TRAINING})

    class Params(PluginParams):
        pass

    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:
        import torch

        U, s, Vh = torch.linalg.svd(weight, full_matrices=False)
        return Decomposition(left=U, s=s, right=Vh)


@hookimpl
def rankbench_register_factorizations(register):
    register(SVD)
