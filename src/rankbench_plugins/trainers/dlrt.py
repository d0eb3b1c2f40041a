"""``dlrt``: dynamical low-rank training with the rank-adaptive integrator -- Schotthöfer, Zangrando, Kusch, Ceruti &
Tudisco, "Low-rank lottery tickets: finding efficient low-rank neural networks via matrix differential equations",
NeurIPS 2022 (``docs/algorithms.md#dlrt``; reference code COMPiLELab/DLRT-Net, ``optimizer_KLS/dlrt_optimizer.py`` and
``optimizer_KLS/Linear_layer_lr_new.py``).

Each site W (out x in) is trained as W = U S V^T (+ bias), U (out x r) and V (in x r) orthonormal, S (r x r); the
forward is x V S^T U^T + b (W is never formed). Per minibatch, with G = dL/dW at the current weight:

    K = U S,  L = V S^T;   grad_K = G V,  grad_L = G^T U     (one backward: the K- and L-forms x V K^T and x L U^T
                                                              have exactly these gradients; see ``_KLProduct``)
    K' = K - lr grad_K,  L' = L - lr grad_L
    U_hat = orth([K', U]),  V_hat = orth([L', V])             (QR; at most min(out, 2r), min(in, 2r) columns)
    S_hat = (U_hat^T U) S (V_hat^T V)^T                       (U_hat S_hat V_hat^T = W exactly)
    second forward/backward at U_hat S_hat V_hat^T:  S_hat <- S_hat - lr U_hat^T G V_hat,  b <- b - lr grad_b
    P, d, Q = svd(S_hat);  r' = smallest j with ||d[j:]||_2 < tau ||d||_2, clipped to [rank_min, rank_max]
    U = U_hat P[:, :r'],  V = V_hat Q[:, :r'],  S = diag(d[:r'])

The network's other parameters take one step of the task's optimiser per minibatch with the second pass's gradient
(``_integrator``). Without truncation (tau = 0) one step is exactly W - lr P_{U_hat} G P_{V_hat}: the plain gradient
step projected on the augmented bases (the paper's local optimality; checked in the tests).

Choices, with the reference's facts:

* Start: ``init="dense"`` (default, ours): the rank-r truncated SVD of the site's initial dense weight, so the
  method starts from the same initialisation as the dense reference cell. ``init="random"`` is the reference's
  adaptive-layer start: U, V random orthonormal, S = diag of the largest r of 2 rmax sorted |N(0, 1)| draws.
* Starting rank: the cap (the reference's adaptive layers start at min(given rank, rmax); its LeNet5 builds the
  800 -> 500 Linear with rank 500, so it starts at rmax = 250).
* Rank cap: min(out, in) // 2 by default (the reference's rmax for adaptive layers); rank_min 2 (reference).
* Truncation rule: as written above (the smallest j over 0..len(d), so the rank can grow to 2r). The reference's
  loop differs in two corner cases: its tail sums skip the last singular value, and when no tail is below the
  tolerance it keeps the old rank instead of 2r.
* Integrator: plain SGD with one learning rate for K, L, S and the bias (default), as the paper's runs
  (``dlr_opt`` with ``torch.optim.SGD``, no momentum); or ``optimizer: adam``, the reference's ``KLS_optim=
  torch.optim.Adam`` with its moments carried index-wise across basis and rank changes (``_integrator``'s docstring).
  The reference's absolute-tolerance option and its final S-only fine-tuning phase are not implemented.
* Convolutions (``DLRTConv2d``), as the reference's ``Conv2d_lr``: the kernel (out, in, kh, kw) is the matrix
  W (out x in kh kw) of its flattened filters, trained by the same integrator; the forward unfolds the input into
  patches (``F.unfold``, the column order of ``weight.reshape(out, -1)``) and applies x V S^T U^T per patch.
* Stored parameters: r (out + in) -- U S merged at inference, the count the reference reports for evaluation
  (``count_params_test``: K and L) and the one the ``svd`` compression uses, so ratios are comparable.

The layers (``DLRTLinear``, ``DLRTConv2d``, ``_KLProduct``) and ``dlrt_layer`` live in ``_dlrt_layers`` (torch),
imported when a run builds them; this module (the plugin's registration) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rankbench.api import hookimpl, lazy_attributes
from rankbench_plugins.trainers._integrator_trainer import IntegratorParams, IntegratorTrainer

if TYPE_CHECKING:
    from rankbench_plugins.trainers._dlrt_layers import DLRTConv2d, DLRTLinear, dlrt_layer  # noqa: F401

# these names live in _dlrt_layers (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(
    __name__, "rankbench_plugins.trainers._dlrt_layers",
    {"DLRTLinear", "DLRTConv2d", "dlrt_layer"},
)


class DLRT(IntegratorTrainer):
    name = "dlrt"
    version = "1"
    description = ("Dynamical low-rank training (Schotthöfer et al. 2022): W = U S V^T, K/L basis step, Galerkin "
                   "step on the augmented core, SVD truncation at tolerance tau.")
    formats: ClassVar[frozenset[str]] = frozenset({"svd"})
    conv_sites: ClassVar[bool] = True  # a kernel as the matrix of its flattened filters (the reference's Conv2d_lr)

    class Params(IntegratorParams):
        pass

    def make_layer(self, linear, factorization, generator):
        from rankbench_plugins.trainers._dlrt_layers import dlrt_layer

        return dlrt_layer(linear, self.params, generator)


@hookimpl
def rankbench_register_selectors(register):
    register(DLRT)
