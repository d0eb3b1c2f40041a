"""``tt``: a Linear's weight as a tensor train -- Oseledets, "Tensor-Train Decomposition" (SIAM J. Sci. Comput.
33(5), 2011), TT-SVD (Alg. 1) and its error bound (Thm 2.2).

W (out x in) is viewed as T = W.reshape(*out_dims, *in_dims) (N = p + q modes) and approximated by

    T[n_1, ..., n_N] ~ G_1[n_1] G_2[n_2] ... G_N[n_N],    G_k[n_k]: r_{k-1} x r_k  (r_0 = r_N = 1),

with sum_k r_{k-1} n_k r_k parameters, fitted by sequential truncated SVDs. A selector sets the N - 1 internal
ranks, each from the spectrum of the sequential unfolding T_<k> (prod n_1..n_k x prod n_{k+1}..n_N): dropping its
tail beyond r_k costs at most the tail's squared sum. Ranks are clipped so that r_k <= r_{k-1} n_k and
r_k <= n_{k+1} r_{k+1}. The layer contracts the input modes core by core.
"""

from __future__ import annotations

from rankbench.api import hookimpl
from rankbench_plugins.factorizations._tensor_train import TensorTrainFactorization


class TT(TensorTrainFactorization):
    name = "tt"
    version = "1"
    description = "Tensor-train layer (TT-SVD) over the reshaped weight; one rank per internal bond."

    def modes(self, out_dims, in_dims):
        return (*out_dims, *in_dims)

    def params_at_ranks(self, shape, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.params_tt(*self.dims(shape), ranks)

    def fit(self, weight, bias, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.fit_tt(weight, *self.dims(tuple(weight.shape)), ranks, bias=bias)


@hookimpl
def rankbench_register_factorizations(register):
    register(TT)
