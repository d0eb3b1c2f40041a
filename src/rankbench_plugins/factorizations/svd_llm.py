"""``svd-llm``: truncation-aware data whitening (``docs/algorithms.md#svd-llm``).

Wang, Zheng, Wan, Zhang (ICLR 2025), "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
Model Compression" (arXiv 2403.07378). With X the calibration inputs of a Linear (tokens x in) and its Gram matrix
G = XᵀX (``SiteStatistics.gram``), take the Cholesky factor S (lower triangular, G = S Sᵀ) and

    W S = U diag(d) Vᵀ,      W_k = U[:, :k] diag(d[:k]) (Vᵀ[:k] S⁻¹).

Since (W - W_k) Xᵀ = (W S - U_k D_k V_kᵀ) S⁻¹ Xᵀ and S⁻¹ Xᵀ has orthonormal rows ((S⁻¹Xᵀ)(S⁻¹Xᵀ)ᵀ = S⁻¹ G S⁻ᵀ = I),

    ||(W - W_k) Xᵀ||_F² = Σ_{i>k} d_i²                      (the paper's Theorem: truncation loss = dropped d_i²),

so W_k minimises the output error on the calibration data over rank-k matrices, and ``s = d`` is the spectrum a
selector should see. left = U, right = Vᵀ S⁻¹ (computed by a triangular solve, never an explicit inverse).

Non-positive-definite G (fewer calibration tokens than input channels, dead channels, round-off): the reference
code catches the Cholesky failure, adds (-λ_min(G) + 1e-6) I and retries. This plugin does the same with two
changes, both documented here and both harmless when G is well conditioned (Cholesky then succeeds at once and
nothing is added):

* the margin is relative, ``jitter * trace(G) / n`` (jitter = 1e-6 by default; the mean eigenvalue of G sets the
  scale, or 1 if G is 0). G is a sum over all calibration tokens of squared activations, so its scale varies over
  many orders of magnitude with the number of tokens and the layer. An absolute 1e-6 is below the round-off of
  the computed λ_min (about n·ε·||G||) for LLM-sized Grams, so the retry can fail again. For a tiny-scale G it would
  instead regularise heavily. A relative margin makes the result invariant to rescaling G (c·G gives the same W_k);
  the tests check that.
* the shift is max(-λ_min, 0) + margin (never subtracting from the diagonal), and if Cholesky still fails the
  margin grows tenfold, up to 8 times, before the decomposition gives up with an error.

With the shift, G' = G + shift·I is used throughout; W is still reproduced exactly at full rank (W S S⁻¹ = W), and
the theorem holds for G' in place of G (as if sqrt(shift)·I were appended to the calibration inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.compression import Decomposition, LowRankFactorization, SiteStatistics, thin_svd

if TYPE_CHECKING:
    import torch

_RETRIES = 8


def whitening_factor(gram: torch.Tensor, jitter: float = 1e-6) -> tuple[torch.Tensor, float]:
    """(S, shift): lower-triangular S with S Sᵀ = G + shift·I, shift = 0 when G is positive definite."""
    import torch

    G = 0.5 * (gram + gram.T)  # remove round-off asymmetry from the accumulation
    S, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return S, 0.0
    n = G.shape[0]
    scale = float(torch.trace(G)) / n
    if not scale > 0:  # also catches NaN
        if not torch.isfinite(G).all():
            raise ValueError("the Gram matrix has non-finite entries")
        scale = 1.0
    lam_min = float(torch.linalg.eigvalsh(G)[0])
    margin = jitter * scale
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    for _ in range(_RETRIES):
        shift = max(-lam_min, 0.0) + margin
        S, info = torch.linalg.cholesky_ex(G + shift * eye)
        if int(info) == 0:
            return S, shift
        margin *= 10.0
    raise ValueError(f"Cholesky of the Gram matrix failed even after a diagonal shift of {shift:.3g}")


class SVDLLM(LowRankFactorization):
    name = "svd-llm"
    version = "1"
    description = "SVD-LLM truncation-aware whitening: SVD of W Chol(XᵀX); truncation loss = dropped singular values."
    needs: ClassVar[frozenset[str]] = frozenset({"gram"})

    class Params(PluginParams):
        jitter: float = Field(
            1e-6, gt=0.0, description="Cholesky fallback margin, relative to the mean eigenvalue trace(G)/n"
        )

    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:
        import torch

        if stats.gram is None:
            raise ValueError("svd-llm needs the calibration statistic 'gram'")
        gram = stats.gram.to(device=weight.device, dtype=weight.dtype)
        n = weight.shape[1]
        if gram.shape != (n, n):
            raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({n}, {n})")
        S, shift = whitening_factor(gram, self.params.jitter)
        U, d, Vh = thin_svd(weight @ S)  # float64 Gram eigendecomposition: the same SVD, about half the time
        right = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)  # Vᵀ S⁻¹
        note = ""
        if shift:
            zero = not bool(gram.abs().max() > 0)
            note = "zero Gram (no calibration input reached the site): plain SVD" if zero else (
                f"Gram not positive definite: Cholesky of G + {shift:.3g} I"
            )
        return Decomposition(left=U, s=d, right=right, note=note)


@hookimpl
def rankbench_register_factorizations(register):
    register(SVDLLM)
