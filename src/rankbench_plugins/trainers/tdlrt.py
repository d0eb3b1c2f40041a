"""``tdlrt``: rank-adaptive training of Tucker-factorized layers -- Zangrando, Schotthöfer, Ceruti, Kusch & Tudisco,
"Geometry-aware training of factorized layers in tensor Tucker format", NeurIPS 2024, arXiv 2305.19059
(``docs/algorithms.md#tdlrt``; no reference implementation of the paper was located).

Each site's weight W (out x in) is the tensor T = W.reshape(*out_dims, *in_dims) (``factorization.dims``, output
modes first, the ``tucker`` factorization's convention) held as

    T = C x_1 U_1 x_2 ... x_d U_d,      U_i (n_i x r_i) orthonormal, core C (r_1 x ... x r_d),

and the forward contracts the input with the factors (input modes projected, the core applied as one GEMM, output
modes expanded; T is never formed). Per minibatch, with G = dL/dT at the current weight and Mat_i the mode-i
unfolding (``rankbench.kinds.tensor_formats.unfold``):

    for every mode i:  Mat_i(C)^T = Q_i R_i (QR),  K_i = U_i R_i^T      (so Mat_i(T) = K_i Q_i^T (x)_{j != i} U_j^T)
                       grad_K_i = Mat_i(G x_{j != i} U_j^T) Q_i          (all modes from one backward: ``_TuckerKL``)
                       U~_i = orth([K_i - lr grad_K_i, U_i])             (QR; at most n_i columns)
    C^ = C x_i (U~_i^T U_i) for all i                                    (C^ x_i U~_i = T exactly)
    second forward/backward at C^ x_i U~_i:  C^ <- C^ - lr G x_i U~_i^T,  b <- b - lr grad_b
    for every mode i:  Mat_i(C^) = P_i diag(s_i) ...  (SVD);  theta = tau ||C^||_F  (= tau ||s_i||_2 for every i)
                       r_i = smallest j with ||s_i[j:]||_2 < theta, clipped to [rank_min, rank cap]
                       (cap_i = min(n_i, floor(max_rank_fraction n_i), rank_max); by default n_i: it does not bind)
    C <- C^ x_i P_i[:, :r_i]^T,  U_i <- U~_i P_i[:, :r_i]                 (the HOSVD truncation of C^)

Without truncation (tau = 0) one step is exactly T - lr G x_i (U~_i U~_i^T), the plain gradient step projected on
the augmented bases (checked in the tests). The network's other parameters take one step of the task's optimiser per
minibatch with the second pass's gradient, as in ``dlrt`` (``_integrator``).

What is the paper's and what is our reading (``docs/algorithms.md#tdlrt`` marks the step details as partly unverified):

* The paper's: the Tucker parametrisation with orthonormal mode bases, the DLRT pattern per mode (a K_i step built
  from the QR of the core's mode-i unfolding, basis augmentation to 2 r_i, projection of the core, a Galerkin step on
  the augmented core, per-mode truncation by the SVDs of the augmented core's unfoldings at a tolerance relative to
  its norm), ranks adapting during training from any initialisation.
* Ours: the transposes. The outline in docs/algorithms.md writes Mat_i(C)^T = Q_i S_i^T, K_i = U_i S_i^T; we take the
  reading under which K_i Q_i^T (x)_{j != i} U_j^T is exactly Mat_i(T) (K_i = U_i R_i^T with R_i the QR's triangular
  factor); the augmented span is the same under either reading when R_i is invertible. Plain SGD with one step for K_i,
  C^ and the bias; all K_i gradients from one backward; the truncation tail rule carried over from DLRT -- the same
  group's later Tucker layer (ScSteffen/RobustDLRT, ``src/low_rank_layers/lr_layer_augBUG_conv2d.py``) uses the same
  tail rule with tau ||d|| per mode unfolding and caps the channel modes at half their size. That cap is *not* our
  default: with it a reshaped MLP layer can never exceed ~0.067 of dense and runs sit exactly at the cap, hiding the
  adaptation. The cap is the parameter ``max_rank_fraction`` (default 1.0: only the mode size binds; 0.5 = the old
  default / RobustDLRT's cap); the *start* is still half each mode size (``init_rank`` None), so ranks can move both
  up (basis augmentation doubles each mode's span per step) and down from the start. Ranks are kept Tucker-feasible (r_i <= prod_{j != i} r_j, ``clip_tucker_ranks``)
  after the per-mode rule.
* Start: ``init="dense"`` (default, ours): the HOSVD of the site's initial dense weight at the starting ranks;
  ``init="random"``: random orthonormal factors and a core drawn U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
  prod_{i > 1} r_i (what the later Tucker layer above does: Kaiming-uniform core, QR-orthonormalised factors).
* Stored parameters: prod r_i + sum n_i r_i (``params_tucker``, the ``tucker`` compression's count).

Convolutions (``TuckerDLRTConv2d``, the paper's subject): a ``Conv2d`` site's kernel is held as the 4-mode Tucker
tensor K = C x_1 U_out x_2 U_in x_3 U_kh x_4 U_kw (modes: out channels, in channels, kernel height, kernel width; the
factorization's ``order_out``/``order_in`` reshaping is not used for kernels) with the same integrator steps as the
Linear layer (``augment``, ``galerkin``, ``truncate`` are the Linear layer's, generic over the number of modes). The
forward *reconstructs the kernel* (O I kh kw values, small next to a batch of feature maps) and calls ``F.conv2d`` --
the simple exact form; the contracted 1x1 / kh x kw / 1x1 convolution chain would only pay off for large channel
counts. In the K-step pass the kernel is a leaf of the autograd graph: its gradient G = dL/dK is read after the single
backward and grad_K_i = Mat_i(G x_{j != i} U_j^T) Q_i is formed from it (the same formula ``_TuckerKL`` evaluates
without forming G for Linear sites). Stored parameters: ``params_tucker((O,), (I, kh, kw), ranks)``. Groups other than
1 are not supported.

The layers (``TuckerDLRTLinear``, ``TuckerDLRTConv2d``, ``_TuckerKL``), ``tucker_apply``, ``mode_caps``,
``start_ranks``, ``hosvd`` and ``tdlrt_layer`` live in ``_tdlrt_layers`` (torch), imported when a run builds them;
this module (the plugin's registration) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from rankbench.api import hookimpl, lazy_attributes
from rankbench_plugins.trainers._integrator_trainer import IntegratorParams, IntegratorTrainer

if TYPE_CHECKING:
    from rankbench_plugins.trainers._tdlrt_layers import (  # noqa: F401
        TuckerDLRTConv2d,
        TuckerDLRTLinear,
        mode_caps,
        start_ranks,
        tdlrt_layer,
        tucker_apply,
    )

# these names live in _tdlrt_layers (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(
    __name__, "rankbench_plugins.trainers._tdlrt_layers",
    {"TuckerDLRTLinear", "TuckerDLRTConv2d", "tdlrt_layer", "tucker_apply", "mode_caps", "start_ranks"},
)


class TDLRT(IntegratorTrainer):
    name = "tdlrt"
    version = "2"
    description = ("Geometry-aware Tucker training (Zangrando et al. 2024): per-mode K steps, Galerkin step on the "
                   "augmented core, per-mode HOSVD truncation at tolerance tau ||C||_F; Linear sites reshaped, "
                   "Conv2d kernels as 4-mode tensors.")
    formats: ClassVar[frozenset[str]] = frozenset({"tucker"})
    conv_sites: ClassVar[bool] = True

    class Params(IntegratorParams):
        init_rank: int | None = Field(
            None, ge=1,
            description="starting rank per mode, clipped to the mode's cap; None = half each mode size (the cap of "
                        "version 1, so a run starts where it did), from where ranks may grow or shrink",
        )
        rank_max: int | None = Field(None, ge=1, description="rank cap per mode (None: only max_rank_fraction binds)")
        max_rank_fraction: float = Field(
            1.0, gt=0.0, le=1.0,
            description="per-mode rank cap as a fraction of the mode size, floor(f n_i) (at least 1). Default 1.0: "
                        "the cap never binds below what tau asks for; 0.5 = version 1's default cap (and the "
                        "RobustDLRT Tucker layer's channel cap)",
        )

    def make_layer(self, linear, factorization, generator):
        from rankbench_plugins.trainers._tdlrt_layers import tdlrt_layer

        return tdlrt_layer(linear, factorization, self.params, generator)


@hookimpl
def rankbench_register_selectors(register):
    register(TDLRT)
