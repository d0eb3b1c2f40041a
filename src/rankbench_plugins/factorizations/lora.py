"""``lora``: low-rank adapters in AdaLoRA's SVD form for fine-tuning (the ``adaptation`` problem kind).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022) adds a trainable update B A to a frozen
weight; Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA, ICLR 2023, Eq. 1-4)
keep it as P diag(E) Q so that ranks can be cut by zeroing entries of E:

    y = W0 x + b + (alpha / r) P diag(E * mask) Q x,     P, Q ~ N(0, init_std^2),  E = 0 at the start,

regularised by AdaLoRA's ||P^T P - I||_F + ||Q Q^T - I||_F (weight ``orth_reg``). A site at rank k stores
k (out + in + 1) parameters. The adapter module, the training loop and the protocol are in
``rankbench.kinds.adaptation``; this plugin names the defaults (PEFT's AdaLoRA: init_std 0.02,
lora_alpha 8; the orthogonality weight 0.1 of AdaLoRA's GLUE scripts) and the initialisation (``init``).

``init: pissa`` -- Meng, Wang and Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", NeurIPS 2024 (PEFT's ``init_lora_weights="pissa"``). With W0 = U S V^T (full SVD, descending) and
r the adapter's rank, the adapter starts on W0's principal part and the frozen weight keeps the residual:

    paper:  A = U_r S_r^{1/2},  B = S_r^{1/2} V_r^T  (PEFT: scaling B A = U_r S_r V_r^T),   W_res = W0 - U_r S_r V_r^T
    here:   P = U_r,  E = S_r / scaling,  Q = V_r^T  (scaling = alpha / r),                  base.weight := W_res

so the adapted model is the pretrained one at the start (W_res + scaling P diag(E) Q = W0) and the adapter's update
dW = scaling P diag(E) Q equals PEFT's scaling B A. The factors map onto P diag(E) Q as the SVD form the adaptation
kind's selectors read (E plays the singular values): the singular values sit in E instead of being split as
S^{1/2} into both factors. Honest deviations: (1) that split differs from the paper's, so plain gradient steps on
(P, E, Q) are not the paper's steps on (A, B) (the same function at the start, a different parameterisation of the
update; the orthogonality regulariser is 0 at the start since P and Q are orthonormal); (2) the SVD is the exact
``torch.linalg.svd`` in float64 (the paper's fast-SVD variant, PEFT's ``pissa_niter_K``, is not offered); (3) a
selector that truncates an adapter re-parameterises its current update (kind ``adaptation``) -- with PiSSA that update
includes the principal part, which the residual weight no longer holds, as in the paper's own rank-r adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rankbench.api import hookimpl
from rankbench.kinds.adaptation import AdapterFactorization

if TYPE_CHECKING:
    from torch import nn

    from rankbench.kinds.layers import SVDAdapter


class LoRA(AdapterFactorization):
    name = "lora"
    version = "2"
    description = (
        "LoRA adapters in SVD form (P diag(E) Q, AdaLoRA's parameterisation) on every site Linear; init gaussian"
        " (AdaLoRA's) or pissa (principal singular triplets of the weight, residual frozen)."
    )

    class Params(AdapterFactorization.Params):
        init: Literal["gaussian", "pissa"] = Field(
            "gaussian",
            description="gaussian: P, Q ~ N(0, init_std^2), E = 0 (AdaLoRA); pissa: P, E, Q on the principal "
            "singular triplets of the weight, the residual frozen in the base weight (PiSSA)",
        )

    def attach(self, model: nn.Module, site_names: list[str], seed: int) -> dict[str, SVDAdapter]:
        adapters = super().attach(model, site_names, seed)
        if self.params.init == "pissa":
            for adapter in adapters.values():
                pissa_initialise(adapter)
        return adapters


def pissa_initialise(adapter: SVDAdapter) -> None:
    """P = U_r, E = S_r / scaling, Q = V_r^T of the base weight W0 (float64 SVD); base weight := W0 - U_r S_r V_r^T."""
    import torch

    r = adapter.init_rank
    if r == 0:
        return
    with torch.no_grad():
        weight = adapter.base.weight
        U, s, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
        principal = (U[:, :r] * s[:r]) @ Vh[:r]
        adapter.P.copy_(U[:, :r])
        adapter.E.copy_(s[:r] / adapter.scaling)
        adapter.Q.copy_(Vh[:r])
        weight.copy_(weight.detach().to(torch.float64) - principal)


@hookimpl
def rankbench_register_factorizations(register):
    register(LoRA)
