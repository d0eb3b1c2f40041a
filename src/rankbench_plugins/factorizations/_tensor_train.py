"""What ``tt`` and ``ttm`` share: a tensor train over the modes n_1..n_N of the weight's tensor, one rank per
internal bond.

A subclass names the train's modes (``modes``: T's p + q modes for ``tt``; the d paired modes o_k i_k for ``ttm``,
with ``matrix_format`` set) and its cost and fit. The rank slots are the sequential unfoldings T_<k>
(prod n_1..n_k x prod n_{k+1}..n_N, k = 1..N-1) with their spectra (``tensor_formats.tt_spectra``), each capped at
the unfolding's rank; ranks are clipped to the feasible set (``tensor_formats.clip_tt_ranks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from rankbench.kinds.tensor_compression import TensorFactorization


class TensorTrainFactorization(TensorFactorization):
    """Base of ``tt`` and ``ttm``: slots and feasible ranks from the train's modes."""

    matrix_format: ClassVar[bool] = False  # True: the TT-matrix train over the paired modes (``tt_spectra``)

    def modes(self, out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> Sequence[int]:
        """The mode sizes n_1..n_N of the train."""
        raise NotImplementedError

    def slots(self, weight):
        from rankbench.kinds import tensor_formats as tf
        out_dims, in_dims = self.dims(tuple(weight.shape))
        dims = self.modes(out_dims, in_dims)
        total = weight.numel()
        shapes = [(math.prod(dims[:k]), total // math.prod(dims[:k])) for k in range(1, len(dims))]
        spectra = tf.tt_spectra(weight, out_dims, in_dims, matrix_format=self.matrix_format)
        return spectra, shapes, [min(s) for s in shapes]

    def feasible(self, shape, ranks):
        from rankbench.kinds import tensor_formats as tf
        return tf.clip_tt_ranks(self.modes(*self.dims(shape)), ranks)
