"""``tucker``: a Linear's weight as a Tucker tensor -- Tucker (1966); De Lathauwer, De Moor & Vandewalle, "A
multilinear singular value decomposition" (HOSVD) and "On the best rank-(R1,...,RN) approximation of higher-order
tensors" (HOOI), SIAM J. Matrix Anal. Appl. 2000; per-mode ranks by EVBMF on the mode unfoldings as in Kim et al.,
"Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile Applications" (ICLR 2016).

W (out x in) is viewed as T = W.reshape(*out_dims, *in_dims) and approximated by

    T ~ G x_1 U_1 x_2 U_2 ... x_N U_N,     U_k: dim_k x r_k orthonormal, G: r_1 x ... x r_N,

with prod_k r_k + sum_k dim_k r_k parameters, fitted by HOSVD then HOOI sweeps. A selector sets one rank per mode
from the spectrum of that mode's unfolding; ranks are clipped to the feasible set (r_k <= prod_{j != k} r_j).
The layer projects the input modes, contracts the core and expands the output modes.

A convolution kernel K (out x in x kh x kw) is factorised as Tucker-2 (Kim et al. 2016, Eq. 2-3): ranks on the two
channel modes only, K ~ G x_1 U_out x_2 U_in with G of r_out x r_in x kh x kw, fitted by HOSVD + HOOI of the 4-way
kernel with full spatial ranks; the layer is a 1x1 conv (in -> r_in), the core conv (r_in -> r_out, the original
stride / padding / dilation) and a 1x1 conv (r_out -> out): in r_in + r_out r_in kh kw + r_out out parameters. Kim et
al. choose the two ranks by EVBMF on the channel unfoldings (``evbmf``); any spectral selector can.
"""

from __future__ import annotations

from pydantic import Field

from rankbench.api import hookimpl
from rankbench.kinds.tensor_compression import TensorFactorization


class Tucker(TensorFactorization):
    name = "tucker"
    version = "1"
    description = "Tucker layer (HOSVD + HOOI) with one rank per tensor mode of the reshaped weight; Tucker-2 convs."
    conv_kernels = True

    class Params(TensorFactorization.Params):
        n_iter: int = Field(20, ge=0, description="HOOI sweeps after the HOSVD initialisation")

    def slots(self, weight):
        from rankbench.kinds import tensor_formats as tf
        if weight.ndim == 4:
            return tf.tucker2_slots(weight)
        out_dims, in_dims = self.dims(tuple(weight.shape))
        dims = (*out_dims, *in_dims)
        total = weight.numel()
        return tf.mode_spectra(weight, out_dims, in_dims), [(d, total // d) for d in dims], list(dims)

    def feasible(self, shape, ranks):
        from rankbench.kinds import tensor_formats as tf
        if len(shape) == 4:
            return tf.clip_tucker2_ranks(shape, ranks)
        out_dims, in_dims = self.dims(shape)
        return tf.clip_tucker_ranks((*out_dims, *in_dims), ranks)

    def params_at_ranks(self, shape, ranks):
        from rankbench.kinds import tensor_formats as tf
        if len(shape) == 4:
            return tf.params_tucker2_conv(shape, ranks)
        out_dims, in_dims = self.dims(shape)
        return tf.params_tucker(out_dims, in_dims, ranks)

    def fit_conv(self, conv, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.fit_tucker2_conv(conv, ranks, n_iter=self.params.n_iter)

    def fit(self, weight, bias, ranks):
        from rankbench.kinds import tensor_formats as tf
        out_dims, in_dims = self.dims(tuple(weight.shape))
        return tf.fit_tucker(weight, out_dims, in_dims, ranks, n_iter=self.params.n_iter, bias=bias)


@hookimpl
def rankbench_register_factorizations(register):
    register(Tucker)
