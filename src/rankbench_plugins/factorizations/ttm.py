"""``ttm``: a Linear's weight in the TT-matrix format -- Novikov, Podoprikhin, Osokin & Vetrov, "Tensorizing Neural
Networks" (NeurIPS 2015), Eq. 4-5; fitted by TT-SVD (Oseledets 2011).

With out = prod_k o_k and in = prod_k i_k (d = order_out = order_in pairs),

    W[(o_1..o_d), (i_1..i_d)] ~ G_1[o_1, i_1] G_2[o_2, i_2] ... G_d[o_d, i_d],   G_k[o_k, i_k]: r_{k-1} x r_k,

with sum_k r_{k-1} o_k i_k r_k parameters: the TT format of W's tensor with output and input modes paired. A
selector sets the d - 1 internal ranks from the spectra of that tensor's sequential unfoldings; ranks are clipped to
the feasible set. The layer multiplies the input reshaped (batch, i_1, ..., i_d) core by core (never forming W).
"""

from __future__ import annotations

from pydantic import model_validator

from rankbench.api import hookimpl
from rankbench_plugins.factorizations._tensor_train import TensorTrainFactorization


class TTM(TensorTrainFactorization):
    name = "ttm"
    version = "1"
    description = "TT-matrix layer (Novikov et al. 2015): output and input modes paired, one rank per bond."

    class Params(TensorTrainFactorization.Params):
        @model_validator(mode="after")
        def _paired(self):
            if self.order_out != self.order_in:
                raise ValueError("ttm pairs output and input modes: order_out must equal order_in")
            return self

    matrix_format = True

    def modes(self, out_dims, in_dims):
        return [o * i for o, i in zip(out_dims, in_dims)]

    def params_at_ranks(self, shape, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.params_ttm(*self.dims(shape), ranks)

    def fit(self, weight, bias, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.fit_ttm(weight, *self.dims(tuple(weight.shape)), ranks, bias=bias)


@hookimpl
def rankbench_register_factorizations(register):
    register(TTM)
