"""``lora``: low-rank adapters in AdaLoRA's SVD form for fine-tuning (the ``adaptation`` problem kind).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022) adds a trainable update B A to a frozen
weight; Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA, ICLR 2023, Eq. 1-4)
keep it as P diag(E) Q so that ranks can be cut by zeroing entries of E:

    y = W0 x + b + (alpha / r) P diag(E * mask) Q x,     P, Q ~ N(0, init_std^2),  E = 0 at the start,

regularised by AdaLoRA's ||P^T P - I||_F + ||Q Q^T - I||_F (weight ``orth_reg``). A site at rank k stores
k (out + in + 1) parameters. The adapter module, the training loop and the protocol are in
``rankbench.kinds.adaptation``; this plugin only names the defaults (PEFT's AdaLoRA: init_std 0.02,
lora_alpha 8; the orthogonality weight 0.1 of AdaLoRA's GLUE scripts).
"""

from __future__ import annotations

from rankbench.api import hookimpl
from rankbench.kinds.adaptation import AdapterFactorization


class LoRA(AdapterFactorization):
    name = "lora"
    version = "1"
    description = "LoRA adapters in SVD form (P diag(E) Q, AdaLoRA's parameterisation) on every site Linear."


@hookimpl
def rankbench_register_factorizations(register):
    register(LoRA)
