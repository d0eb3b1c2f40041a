"""``eora``: a base factorization's truncation plus an EoRA compensation of its error (``docs/algorithms.md#eora``).

Liu, Yang, Wang, Fung, Yin, Sakr, Muralidharan, Cheng, Kautz, Wang, Molchanov & Chen, "EoRA: Training-free
Compensation for Compressed LLM with Eigenspace Low-Rank Approximation" (arXiv 2410.21271, 2024; reference code
NVlabs/EoRA). After a site was compressed to W', EoRA adds a rank-r residual path B A fitted to the compression error
ΔW = W - W' in the eigenspace of the site's input activations. In this repository's conventions (weights out x in,
y = W x, X the calibration inputs as rows, tokens x in, G = XᵀX = ``SiteStatistics.gram``):

    G = Q Λ Qᵀ                                   (eigendecomposition; Λ descending or not, it does not matter)
    ΔW' = ΔW Q Λ^{1/2}                           (the error projected into the eigenspace, scaled by sqrt(λ))
    ΔW' ≈ U_r Σ_r V_rᵀ                           (truncated SVD, rank r)
    B = U_r Σ_r^{1/2},   A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ        (mapped back; B A = [ΔW']_r Λ^{-1/2} Qᵀ)

Since ||(ΔW - M) Xᵀ||_F² = tr((ΔW - M) G (ΔW - M)ᵀ) = ||(ΔW - M) Q Λ^{1/2}||_F² and Q Λ^{1/2} is invertible, the
Eckart-Young theorem gives: B A minimises the activation-weighted error ||(W - W' - M) Xᵀ||_F over all M of rank
<= r, and the minimum is Σ_{i>r} σ_i(ΔW')². The site's layer then computes (W' + B A) x: the base's factors
[A_k; B_k] of rank k with the compensation beside them, rank k + r.

How it composes with "any factorization". ``base`` names a registered ``LowRankFactorization`` (``svd``, ``asvd``,
``svd-llm``, ...; ``base_params`` its parameters), resolved through the host's plugin registry (the entry points
loaded by ``rankbench.plugins.load_plugins``), never imported. ``decompose`` is the base's: selectors see the base's
spectrum and the selector's rank k truncates it as the base would (W' = the base's rank-k factors). The compression
kind then asks ``compensation`` for the extra factors (``LowRankFactorization.compensation``). ``params_at_rank``
counts them honestly: the base's cost at rank k plus r' (out + in), r' = min(r, min(out, in) - k) (the residual of a
rank-k truncation has rank <= min(out, in) - k, so more components would store nothing new), so budgets
(``param_ratio``) are met with the compensation included.

Parameters and defaults: ``base`` = ``svd``, ``base_params`` = {}, ``eigen_floor`` = 1e-8, ``rank`` r = 0 (no
compensation). The paper has no default rank (its experiments use ranks in the hundreds on 4096-wide LLaMA layers);
suites set r and make it a budget axis. r = 0 by default because the compensation comes on top of the base's rank
k >= 1: on tiny layers (an 8 x 2 weight) rank 1 plus any compensation exceeds a parameter budget that the base alone
meets.

Deviations / numerics: the reference code clamps negative eigenvalues of G to its smallest positive one (and adds
1e-6 I if the inverse fails); here every eigenvalue below ``eigen_floor`` x (mean eigenvalue, trace(G)/n) is raised to
that floor, which also covers the rank-deficient G of few calibration tokens (fewer tokens than input channels):
directions the calibration data never excites get a tiny weight in ΔW' and are mapped back unamplified. With G
positive definite above the floor nothing changes and the minimisation above is exact. G is the raw sum over tokens
(the reference averages it); the result does not depend on the scale. Rank r = 0 adds nothing. A base offered by a
``--plugins-dir`` file cannot be resolved (only entry points are). Cell ids hash this file, not the base's source.
Selectors that differentiate through singular values (``sigma_loss``) see the base's truncation without the
compensation.
"""

from __future__ import annotations

import functools

from typing import TYPE_CHECKING, Any

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.compression import Decomposition, LowRankFactorization, SiteStatistics

if TYPE_CHECKING:
    import torch


@functools.lru_cache(maxsize=None)
def registered_factorization(name: str) -> type[LowRankFactorization]:
    """The class registered as factorization ``name`` (through the host's registry of entry points; the registry
    is loaded once per process, not once per cell)."""
    from rankbench.plugins import load_plugins

    registry = load_plugins()
    if name not in registry.plugins["factorization"]:
        known = ", ".join(registry.names("factorization"))
        raise ValueError(f"eora: no factorization {name!r} is registered (known: {known})")
    cls = registry.get("factorization", name).cls
    if not issubclass(cls, LowRankFactorization) or issubclass(cls, EoRA):
        raise ValueError(f"eora: base {name!r} is not a matrix factorization of Linear weights that eora can compensate")
    return cls


def compensation_rank(rank: int, shape: tuple[int, int], kept: int) -> int:
    """r' = min(r, min(out, in) - k): the residual of a rank-k truncation of a full decomposition has rank at most
    min(out, in) - k, so more compensation components than that would store nothing new."""
    return max(0, min(int(rank), min(int(d) for d in shape) - int(kept)))


def eigen_whitening(gram: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, sqrt λ) of G = Q Λ Qᵀ, the eigenvalues raised to ``floor`` x trace(G)/n (1 x floor for a zero G)."""
    import torch

    G = 0.5 * (gram + gram.T)
    lam, Q = torch.linalg.eigh(G)
    scale = float(torch.trace(G)) / G.shape[0]
    scale = scale if scale > 0 else 1.0
    return Q, lam.clamp_min(floor * scale).sqrt()


def eora_factors(residual: torch.Tensor, Q: torch.Tensor, root: torch.Tensor,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A), out x r and r x in, with B A = [ΔW Q Λ^{1/2}]_r Λ^{-1/2} Qᵀ (the module docstring's equations)."""
    import torch

    U, S, Vh = torch.linalg.svd(residual @ (Q * root), full_matrices=False)
    r = min(int(rank), S.shape[0])
    half = S[:r].sqrt()
    B = U[:, :r] * half
    A = (half[:, None] * Vh[:r] / root) @ Q.T
    return B, A


class EoRA(LowRankFactorization):
    name = "eora"
    version = "1"
    description = (
        "EoRA: the base factorization's rank-k truncation plus a rank-r compensation of its error in the eigenspace "
        "of the input activations (minimises ||(W - W' - BA) X^T||_F); parameters count both."
    )

    class Params(PluginParams):
        base: str = Field("svd", description="the registered matrix factorization whose truncation is compensated")
        base_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the base factorization")
        rank: int = Field(0, ge=0, description="rank r of the compensation (0, the default: none, the base alone)")
        eigen_floor: float = Field(
            1e-8, gt=0.0, description="eigenvalues of X^T X raised to this fraction of their mean"
        )

    def __init__(self, params: PluginParams | None = None):
        super().__init__(params)
        cls = registered_factorization(self.params.base)
        self.base = cls(cls.Params.model_validate(self.params.base_params))
        self.needs = frozenset(self.base.needs) | {"gram"}
        self._whitening: dict[int, tuple] = {}  # id(gram) -> (gram, Q, sqrt λ), per cell

    @property
    def decomposed_by(self) -> LowRankFactorization:
        """The base: every compensation rank reuses its decompositions (memoised and cached on disk as the base's)."""
        return self.base

    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:
        return self.base.decompose(weight, stats)

    def params_at_rank(self, shape: tuple[int, int], rank: int) -> int:
        out_features, in_features = (int(d) for d in shape)
        extra = compensation_rank(self.params.rank, shape, rank) * (out_features + in_features)
        return self.base.params_at_rank(shape, rank) + extra

    def compensation(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     stats: SiteStatistics) -> tuple[torch.Tensor, torch.Tensor] | None:
        if stats.gram is None:
            raise ValueError("eora needs the calibration statistic 'gram'")
        rank = compensation_rank(self.params.rank, tuple(weight.shape), A.shape[1])
        if rank == 0:
            return None
        Q, root = self._eigen(stats.gram)
        residual = weight.to(A) - A @ B
        return eora_factors(residual, Q.to(A), root.to(A), rank)

    def _eigen(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, sqrt λ) of a site's Gram matrix, computed once per cell (a selector may swap the sites many times)."""
        import torch

        key = id(gram)
        if key not in self._whitening:
            self._whitening[key] = (gram, *eigen_whitening(gram.to(torch.float64), self.params.eigen_floor))
        return self._whitening[key][1:]


@hookimpl
def rankbench_register_factorizations(register):
    register(EoRA)
