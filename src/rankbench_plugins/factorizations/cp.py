"""``cp``: a Linear's weight as a CP (CANDECOMP/PARAFAC) tensor -- Hitchcock (1927); Kolda & Bader, "Tensor
Decompositions and Applications" (SIAM Review 2009, §3, CP-ALS of Fig. 3.3); for network layers Lebedev et al.,
"Speeding-up Convolutional Neural Networks Using Fine-tuned CP-Decomposition" (ICLR 2015).

W (out x in) is viewed as T = W.reshape(*out_dims, *in_dims) (``rankbench.kinds.tensor_formats``' convention) and approximated by

    T ~ sum_{r=1}^{R} lambda_r a^(1)_r o a^(2)_r o ... o a^(N)_r,       R (sum_k dim_k + 1) parameters,

fitted by CP-ALS from the leading singular vectors of the unfoldings. The layer contracts the input with the input
factors and expands with the output factors (never forming W). The rank R is chosen like a matrix rank from W's
singular values (see ``rankbench.kinds.tensor_compression``), capped where CP stores as much as W.

A convolution kernel K (out x in x kh x kw) is factorised as in Lebedev et al. 2015 (Eq. 2-5): the rank-R CP of the
4-way kernel (CP-ALS), applied as a 1x1 conv (in -> R), a depthwise kh x 1 conv, a depthwise 1 x kw conv and a 1x1
conv (R -> out, lambda folded in): R (out + in + kh + kw) parameters. Lebedev et al. fit by non-linear least squares
and then fine-tune; here CP-ALS and no fine-tuning (post-training compression).
"""

from __future__ import annotations

from pydantic import Field

from rankbench.api import hookimpl
from rankbench.kinds.tensor_compression import TensorFactorization


class CP(TensorFactorization):
    name = "cp"
    version = "1"
    description = "CP (CANDECOMP/PARAFAC) layer fitted by CP-ALS; rank R from the weight's spectrum; CP convs."
    conv_kernels = True

    class Params(TensorFactorization.Params):
        n_iter: int = Field(100, ge=1, description="CP-ALS sweeps at most")
        tol: float = Field(1e-7, gt=0.0, description="stop when the relative error changes by less than this")

    def slots(self, weight):
        import torch

        if weight.ndim == 4:  # a conv kernel: the spectrum of its out x (in kh kw) matrix
            matrix = weight.reshape(weight.shape[0], -1)
            cap = max(1, weight.numel() // sum(weight.shape))
            return [torch.linalg.svdvals(matrix).cpu().numpy()], [tuple(matrix.shape)], [cap]
        out_dims, in_dims = self.dims(tuple(weight.shape))
        cap = max(1, (weight.shape[0] * weight.shape[1]) // (sum(out_dims) + sum(in_dims) + 1))
        return [torch.linalg.svdvals(weight).cpu().numpy()], [tuple(weight.shape)], [cap]

    def params_at_ranks(self, shape, ranks):
        from rankbench.kinds import tensor_formats as tf
        if len(shape) == 4:
            return tf.params_cp_conv(shape, int(ranks[0]))
        out_dims, in_dims = self.dims(shape)
        return tf.params_cp(out_dims, in_dims, int(ranks[0]))

    def fit_conv(self, conv, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.fit_cp_conv(conv, int(ranks[0]), n_iter=self.params.n_iter, tol=self.params.tol)

    def fit(self, weight, bias, ranks):
        from rankbench.kinds import tensor_formats as tf
        out_dims, in_dims = self.dims(tuple(weight.shape))
        return tf.fit_cp(weight, out_dims, in_dims, int(ranks[0]), n_iter=self.params.n_iter, tol=self.params.tol,
                         bias=bias)


@hookimpl
def rankbench_register_factorizations(register):
    register(CP)
