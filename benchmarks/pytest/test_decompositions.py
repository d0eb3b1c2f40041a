"""pytest-benchmark: the decompositions of the compression kind, each against a float64 ``torch.linalg.svd`` (what
every SVD variant computed before decompositions got a ``precision``) in the same run.

Weights: SmolLM2-135M's four site shapes (q/o_proj 576 x 576, k/v_proj 192 x 576, gate/up_proj 1536 x 576,
down_proj 576 x 1536), seeded random with random singular vectors and a spectrum decaying over four decades; one
torch thread. Engines, per shape:

* ``svd-float64``: ``torch.linalg.svd`` in float64, the reference;
* ``svd-float32``: the same in float32 -- what ``svd`` and ``asvd`` do now (``precision = "float32"``; their spectra
  stay within 1e-5 of float64 on SmolLM2, ``tests/test_decomposition_precision.py``);
* ``gram-float64``: ``rankbench.kinds.compression.thin_svd`` (eigendecomposition of the smaller Gram matrix) --
  what ``svd-llm`` and ``fwsvd`` do now.

``extra_info["time_ratio_vs_svd_float64"]``: the engine's median over the reference's median (same run; the
reference of a shape runs first) and ``spectrum_rel_error`` against it.
"""

import pytest
import torch

from rankbench.kinds.compression import thin_svd

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
ENGINES = {
    "svd-float64": lambda m: torch.linalg.svd(m, full_matrices=False),
    "svd-float32": lambda m: torch.linalg.svd(m.float(), full_matrices=False),
    "gram-float64": thin_svd,
}
_reference: dict[str, tuple[float, torch.Tensor]] = {}


def weight_like(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = min(shape)
    left, _ = torch.linalg.qr(torch.randn(shape[0], p, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(shape[1], p, generator=g, dtype=torch.float64))
    return (left * torch.logspace(0, -4, p, dtype=torch.float64)) @ right.T


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("site", list(SHAPES))
def test_decomposition(benchmark, single_thread, site, engine):
    benchmark.group = f"decompose-{site}"
    matrix = weight_like(SHAPES[site])
    _, s, _ = benchmark.pedantic(ENGINES[engine], args=(matrix,), rounds=7, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if engine == "svd-float64":
        _reference[site] = (median, s)
    elif site in _reference:
        reference_median, reference_s = _reference[site]
        benchmark.extra_info["time_ratio_vs_svd_float64"] = median / reference_median
        error = float((s.double() - reference_s).norm() / reference_s.norm())
        benchmark.extra_info["spectrum_rel_error"] = error
        assert error < 1e-5
