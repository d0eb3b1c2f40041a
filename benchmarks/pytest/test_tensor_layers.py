"""pytest-benchmark: the tensor-format factorizations (``src/rankbench/kinds/tensor_formats.py``) -- fit time and
reconstruction error against tensorly, and forward latency of the fitted layers against the dense ``nn.Linear``.

Weights: the four Linear shapes of the shipped ViT suite (``suites/vit.yaml``: width 64, MLP ratio 2) -- qkv 192x64,
proj 64x64, fc1 128x64, fc2 64x128 -- each a seeded random matrix with random singular vectors and an exponentially
decaying spectrum s_i = exp(-i / 6) (the ``weight_like`` of ``tests/test_tensor_formats.py``). Every format views a
weight as the plugins do by default: ``factor_dims(out, 2)`` output modes and ``factor_dims(in, 2)`` input modes
(cp / tucker / tt: the 4-way tensor W.reshape(*out_dims, *in_dims); ttm: the modes paired), plugin default fit
settings (cp: 100 sweeps, tol 1e-7; tucker: HOSVD + 20 HOOI sweeps). Ranks are picked per weight at a kept-parameter
ratio of 0.5 with the ``params_*`` counters: the largest common rank whose (clipped) parameter count fits in
0.5 * out * in (the ``uniform`` selector's rule), then each rank slot raised by one in turn while the count still
fits (Tucker's common rank alone lands at 0.33-0.45). The realised ratios are in ``extra_info["param_ratio"]``.

* ``tensor-fit-<format>``: fitting all four weights, ``engine=rankbench`` (``fit_cp`` CP-ALS, ``fit_tucker`` HOOI,
  ``fit_tt`` TT-SVD, ``fit_ttm`` TT-matrix SVD; torch, float64) against ``engine=tensorly``, the reference
  (``parafac`` with ``init="svd"``, ``tucker``, ``tensor_train``, ``tensor_train_matrix``; numpy backend, float64)
  at the same ranks, iteration caps and tolerances (both stop on the absolute change of the relative error). Both
  engines run single-threaded (torch threads, and numpy's BLAS through threadpoolctl where it is installed).
  ``extra_info``: each engine's relative reconstruction error ||W - W_hat||_F / ||W||_F over the four weights
  together (``rel_error``) and per weight; the ``rankbench`` entry adds ``fit_time_ratio`` (its median / tensorly's
  median, same run) and ``rel_error_ratio`` (its error / tensorly's). The tensorly entry of a format runs first;
  the ratios are missing when it was deselected.
* ``tensor-forward``: one forward pass of each of the four layers on a ViT-shaped batch (128 images x 17 tokens x
  in_features, float32, ``torch.no_grad``, one torch thread), for ``dense`` (the ``nn.Linear``, the reference),
  ``svd`` (the two-factor ``LowRankLinear`` of ``src/rankbench/kinds/compression.py`` at k = floor(0.5 m n / (m + n))),
  ``cp``, ``tucker``, ``tt``, ``ttm``. ``extra_info["latency_ratio_vs_dense"]``: factorized / dense time of the
  four-layer pass, measured in the same test by interleaving calls of the two (median of each over the rounds, so
  load from other processes hits both alike); ``latency_ratio_vs_dense_per_site`` likewise per weight;
  ``flops_per_site``: each tensor layer's FLOPs -- its contraction per row, reconstructing its dense weight, a dense
  row, the planned (opt_einsum) contraction of this batch -- and the routes its cost model chose for this batch
  (``TensorLinear.route``) with the weight cached (``route_cached``: no gradient, as here) and without (``route``).
* ``tensor-forward-sites``: the issue's per-layer table, one entry per format: every Linear shape of the shipped
  ViT (above, 128 x 17 token rows) and MLP suites (``mlp-classification`` on MNIST, hidden 512: 512x784 and 10x512;
  on digits, hidden 64: 64x64 and 10x64; 128 rows, the task's ``batch_size``) at RATIO. Per site
  (``extra_info["sites"]``), each a median over ``PAIRED_ROUNDS`` interleaved rounds against the dense
  ``nn.Linear`` of the same weight, one torch thread, for the layer choosing its routes ``before`` (the FLOP model
  with the previous weight, ``CONTRACTION_COST = 3``) and ``after`` (the default: the routes timed once per key,
  ``TensorLinear.measured_routes``) -- ``inference``: factorized / dense forward under ``torch.no_grad`` (what a
  task's ``latency_ms`` times; a cached dense weight when reconstruct is taken); ``training``: the same with autograd
  on (factors requiring grad, forward only); ``training_step``: forward + backward to all parameters
  (``torch.autograd.grad``) over the dense layer's; ``reconstruct_uncached`` / ``contraction`` / ``planned`` --
  each route forced, no_grad, over the dense time; ``routes`` -- what each choice takes cached (no grad) and uncached
  (grad); ``measured_ms`` -- the times the measured choice saw; ``flops`` -- dense GEMM, ``to_dense``, reconstruct
  + GEMM uncached, hand-written contraction and planned contraction of the batch (torch's flop counter);
  ``route_rel_error`` -- float32 max |route - reconstruct| / max |reconstruct| of the two contractions; and
  ``param_ratio``. ``extra_info["target_met"]``: every site's inference ratio <= 1.2 (the issue's target; recorded,
  not asserted, as timings on a shared machine are noisy). The benchmark's own timing is the cached inference pass
  over all sites. ``python benchmarks/pytest/test_tensor_layers.py [--min] [formats...]`` prints the same as a table
  (``--min``: the minimum over the rounds instead of the median).

Before anything is timed, the module frees one ~32 MiB block so that glibc's dynamic mmap threshold is settled (see
``settled_allocator``): otherwise the timings depend on what the process freed earlier, by up to 2x.

Run: ``make benchmark`` (``pytest benchmarks/pytest -m "slow or not slow" --benchmark-only``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
import time

import numpy as np
import pytest
import torch
from torch import nn

from rankbench.kinds import tensor_formats as tf
from rankbench_plugins.factorizations.cp import CP
from rankbench_plugins.factorizations.tt import TT
from rankbench_plugins.factorizations.ttm import TTM
from rankbench_plugins.factorizations.tucker import Tucker
from rankbench.kinds.compression import LowRankLinear

SHAPES = {"qkv": (192, 64), "proj": (64, 64), "fc1": (128, 64), "fc2": (64, 128)}  # (out, in), suites/vit.yaml
RATIO = 0.5
TOKENS = 128 * 17  # a batch of 128 images of 16 patches + the class token
FORMATS = ("cp", "tucker", "tt", "ttm")
PLUGINS = {"cp": CP, "tucker": Tucker, "tt": TT, "ttm": TTM}
PAIRED_ROUNDS = 25  # interleaved dense / factorized rounds for the latency ratio
_FIT = {}  # (format, engine) -> (median seconds, rel_error), for the ratios of the later entry


def weight_like(out: int, inp: int, seed: int, decay: float = 6.0) -> torch.Tensor:
    """Random singular vectors, spectrum s_i = exp(-i / decay) (as in tests/test_tensor_formats.py); float64."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    U = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))[0]
    return (U * torch.exp(-torch.arange(k, dtype=torch.float64) / decay)) @ V.T


WEIGHTS = {name: weight_like(*shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())}


# --- ranks at a kept-parameter ratio ----------------------------------------------------------------------------------


def fill_budget(count, caps, limit: float) -> tuple[int, ...]:
    """The largest common rank (each slot clipped to its cap) with count <= limit, then +1 per slot in turn while
    the count still fits."""
    k = 1
    while k < max(caps) and count([min(k + 1, c) for c in caps]) <= limit:
        k += 1
    ranks = [min(k, c) for c in caps]
    grown = True
    while grown:
        grown = False
        for i in range(len(ranks)):
            trial = ranks[:i] + [ranks[i] + 1] + ranks[i + 1:]
            if trial[i] <= caps[i] and count(trial) <= limit:
                ranks, grown = trial, True
    return tuple(ranks)


def site_ranks(fmt: str, shape: tuple[int, int]):
    """(out_dims, in_dims, feasible ranks, kept-parameter ratio) of a weight in a format at RATIO."""
    out_dims, in_dims = PLUGINS[fmt](PLUGINS[fmt].Params()).dims(shape)  # the plugin's default reshaping
    dims, dense = (*out_dims, *in_dims), shape[0] * shape[1]
    limit = RATIO * dense
    if fmt == "cp":
        cap = max(1, dense // (sum(dims) + 1))  # as the cp plugin: no larger than the dense weight
        ranks = fill_budget(lambda r: tf.params_cp(out_dims, in_dims, r[0]), [cap], limit)
        count = tf.params_cp(out_dims, in_dims, ranks[0])
    elif fmt == "tucker":
        ranks = tf.clip_tucker_ranks(dims, fill_budget(lambda r: tf.params_tucker(out_dims, in_dims, r), dims, limit))
        count = tf.params_tucker(out_dims, in_dims, ranks)
    elif fmt == "tt":
        caps = tf.clip_tt_ranks(dims, [dense] * (len(dims) - 1))
        ranks = tf.clip_tt_ranks(dims, fill_budget(lambda r: tf.params_tt(out_dims, in_dims, r), caps, limit))
        count = tf.params_tt(out_dims, in_dims, ranks)
    else:
        paired = [o * i for o, i in zip(out_dims, in_dims)]
        caps = tf.clip_tt_ranks(paired, [dense] * (len(paired) - 1))
        ranks = tf.clip_tt_ranks(paired, fill_budget(lambda r: tf.params_ttm(out_dims, in_dims, r), caps, limit))
        count = tf.params_ttm(out_dims, in_dims, ranks)
    return out_dims, in_dims, tuple(int(r) for r in ranks), count / dense


# --- fitting --------------------------------------------------------------------------------------------------------


def fit_ours(fmt: str, W: torch.Tensor, out_dims, in_dims, ranks) -> tf.TensorLinear:
    """The plugin's fit with its default parameters."""
    plugin = PLUGINS[fmt](PLUGINS[fmt].Params())
    assert plugin.dims(tuple(W.shape)) == (out_dims, in_dims)
    return plugin.fit(W, None, ranks)


def fit_tensorly(fmt: str, T: np.ndarray, ranks) -> np.ndarray:
    """tensorly at the same ranks / sweeps / tolerance; returns the reconstructed tensor (outside the timing)."""
    import tensorly as tl
    from tensorly import decomposition as dec

    if fmt == "cp":
        p = CP.Params()
        return tl.cp_to_tensor(dec.parafac(T, ranks[0], n_iter_max=p.n_iter, init="svd", tol=p.tol, random_state=0))
    if fmt == "tucker":  # tensorly's n_iter_max counts HOOI sweeps after the HOSVD, like ours; our tol 1e-10
        return tl.tucker_to_tensor(dec.tucker(T, rank=list(ranks), n_iter_max=Tucker.Params().n_iter, init="svd",
                                              tol=1e-10))
    if fmt == "tt":
        return tl.tt_to_tensor(dec.tensor_train(T, rank=[1, *ranks, 1]))
    return tl.tt_matrix_to_tensor(dec.tensor_train_matrix(T, rank=[1, *ranks, 1]))  # T: (o_1..o_d, i_1..i_d)


@pytest.fixture(scope="module", autouse=True)
def settled_allocator():
    """Free one ~32 MiB block before anything is timed. glibc's malloc hands out blocks above its dynamic mmap
    threshold (128 KiB at start, raised to the size of any larger block freed, up to 32 MiB) as fresh mmap'd pages,
    so without this a layer's time depends on what the process happened to free before (the dense pass measured
    2.6 ms or 1.3 ms, TTM's fc2 25 ms or 10 ms); afterwards every engine and layer runs at the same, settled
    threshold. Harmless elsewhere."""
    block = torch.empty((32 << 20) - (1 << 16), dtype=torch.uint8)
    block.fill_(0)
    del block
    yield


@pytest.fixture
def single_thread():
    """One torch thread, and one BLAS / OpenMP thread for numpy where threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy keeps its default threads
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with limits:
        yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs")  # tensorly: CP rank above a mode size
@pytest.mark.parametrize("engine", ["tensorly", "rankbench"])  # the reference first: the ratios go on ours
@pytest.mark.parametrize("fmt", FORMATS)
def test_fit(benchmark, single_thread, fmt, engine):
    benchmark.group = f"tensor-fit-{fmt}"
    sites = {name: site_ranks(fmt, tuple(W.shape)) for name, W in WEIGHTS.items()}
    tensors = {name: WEIGHTS[name].reshape(*o, *i).numpy() for name, (o, i, _, _) in sites.items()}

    if engine == "rankbench":
        def fit_all():
            return {name: fit_ours(fmt, WEIGHTS[name], o, i, r) for name, (o, i, r, _) in sites.items()}

        fitted = benchmark(fit_all)
        approx = {name: layer.to_dense().detach().numpy() for name, layer in fitted.items()}
    else:
        pytest.importorskip("tensorly")

        def fit_all():
            return {name: fit_tensorly(fmt, tensors[name], r) for name, (_, _, r, _) in sites.items()}

        approx = {name: T.reshape(WEIGHTS[name].shape) for name, T in benchmark(fit_all).items()}

    residual2 = {name: float(np.sum((approx[name] - W.numpy()) ** 2)) for name, W in WEIGHTS.items()}
    norm2 = {name: float(W.square().sum()) for name, W in WEIGHTS.items()}
    rel_error = math.sqrt(sum(residual2.values()) / sum(norm2.values()))
    info = benchmark.extra_info
    info["ranks"] = {name: list(r) for name, (_, _, r, _) in sites.items()}
    info["param_ratio"] = {name: round(ratio, 4) for name, (_, _, _, ratio) in sites.items()}
    info["rel_error"] = rel_error
    info["rel_error_per_site"] = {name: math.sqrt(residual2[name] / norm2[name]) for name in WEIGHTS}
    median = benchmark.stats.stats.median
    _FIT[fmt, engine] = (median, rel_error)
    if engine == "rankbench" and (fmt, "tensorly") in _FIT:
        ref_median, ref_error = _FIT[fmt, "tensorly"]
        info["tensorly_rel_error"] = ref_error
        info["fit_time_ratio"] = median / ref_median
        info["rel_error_ratio"] = rel_error / ref_error
    assert all(0.5 * RATIO < r <= RATIO for _, _, _, r in sites.values())
    assert 0 < rel_error < 1


# --- forward latency --------------------------------------------------------------------------------------------------


def dense_layer(W: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(bias)
    return layer


def factorized_layer(kind: str, W: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """The layer a compression cell swaps in at RATIO (fitted in float64 like the plugins, then float32)."""
    if kind == "svd":
        out, inp = W.shape
        k = max(1, min(out, inp, math.floor(RATIO * out * inp / (out + inp))))
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        root = s[:k].sqrt()  # Decomposition.factors: singular values split evenly
        return LowRankLinear((U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float(), bias)
    out_dims, in_dims, ranks, _ = site_ranks(kind, tuple(W.shape))
    return PLUGINS[kind](PLUGINS[kind].Params()).fit(W, bias.double(), ranks).to(dtype=torch.float32)


@pytest.fixture(scope="module")
def forward_case():
    g = torch.Generator().manual_seed(1)
    biases = {name: 0.1 * torch.randn(W.shape[0], generator=g) for name, W in WEIGHTS.items()}
    inputs = {name: torch.randn(128, 17, W.shape[1], generator=g) for name, W in WEIGHTS.items()}
    dense = {name: dense_layer(W, biases[name]) for name, W in WEIGHTS.items()}
    return biases, inputs, dense


def run_block(layers, inputs):
    return [layers[name](inputs[name]) for name in layers]


def paired_times(first, second, rounds: int) -> tuple[float, float]:
    """Median seconds of two callables timed alternately (first, second, first, ...) after one warm-up call each."""
    first(), second()
    a, b = [], []
    for _ in range(rounds):
        for f, out in ((first, a), (second, b)):
            start = time.perf_counter()
            f()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, LowRankLinear):
        return layer.up.weight @ layer.down.weight
    return layer.to_dense()


def weight_params(layer: nn.Module) -> int:
    return sum(p.numel() for name, p in layer.named_parameters() if not name.endswith("bias"))


@pytest.mark.benchmark(group="tensor-forward")
@pytest.mark.parametrize("kind", ["dense", "svd", *FORMATS])
def test_forward(benchmark, single_thread, forward_case, kind):
    biases, inputs, dense = forward_case
    if kind == "dense":
        layers = dense
    else:
        layers = {name: factorized_layer(kind, W, biases[name]) for name, W in WEIGHTS.items()}
    info = benchmark.extra_info
    with torch.no_grad():
        outputs = benchmark(run_block, layers, inputs)
        for name, y in zip(layers, outputs):  # the layer computes what its own dense weight would
            expected = inputs[name] @ dense_weight(layers[name]).T + biases[name]
            assert torch.allclose(y, expected, atol=1e-4, rtol=1e-3)
        if kind != "dense":
            per_site = {
                name: paired_times(lambda n=name: dense[n](inputs[n]), lambda n=name: layers[n](inputs[n]),
                                   PAIRED_ROUNDS)
                for name in layers
            }
            info["latency_ratio_vs_dense"] = sum(f for _, f in per_site.values()) / sum(d for d, _ in per_site.values())
            info["latency_ratio_vs_dense_per_site"] = {name: f / d for name, (d, f) in per_site.items()}
        if kind in FORMATS:  # FLOPs beside the times: the two routes' counts and the one the cost model took
            info["flops_per_site"] = {name: {**layer.flop_counts(TOKENS), "route": layer.route(TOKENS),
                                             "route_cached": layer.route(TOKENS, cached=True)}
                                      for name, layer in layers.items()}
    info["weight_params"] = sum(weight_params(layer) for layer in layers.values())
    info["param_ratio"] = info["weight_params"] / sum(W.numel() for W in WEIGHTS.values())
    assert kind == "dense" or 0.5 * RATIO < info["param_ratio"] <= RATIO


# --- per-layer ratios on the shipped ViT and MLP shapes ---------------------------------------------------------------

MLP_ROWS = 128  # mlp-classification's batch_size
SITES = {  # name: ((out, in), rows of the batch)
    **{f"vit.{name}": (shape, TOKENS) for name, shape in SHAPES.items()},
    "mlp-mnist.layers.0": ((512, 784), MLP_ROWS), "mlp-mnist.layers.1": ((10, 512), MLP_ROWS),  # suites/train.yaml
    "mlp-digits.layers.0": ((64, 64), MLP_ROWS), "mlp-digits.layers.1": ((10, 64), MLP_ROWS),  # quickstart, nightly
}
INFERENCE_TARGET = 1.2  # the bound on factorized / dense forward time at param_ratio <= 0.5


STATISTIC = statistics.median  # of the interleaved rounds; ``python test_tensor_layers.py --min``: min


ROUND_SECONDS = 2e-3  # a round times each callable over a block of calls lasting at least this long


def interleaved_medians(calls: dict, rounds: int) -> dict[str, float]:
    """Median (``STATISTIC``) seconds per call of each callable, all timed once per round (one warm-up call each
    first), in an order shuffled per round (seeded) so that none always runs after the same neighbour or at the same
    place: a fixed order biased two identical calls by up to 10%. A round times a block of calls of one callable
    lasting at least ``ROUND_SECONDS`` (the count fixed per callable from its warm-up), so that a layer running in
    ~10 us (the digits MLP's) is not measured at the resolution of one timer read and one scheduler tick."""
    blocks = {}
    for key, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        blocks[key] = max(1, math.ceil(ROUND_SECONDS / max(time.perf_counter() - start, 1e-9)))
    times = {key: [] for key in calls}
    keys, shuffle = list(calls), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(keys)
        for key in keys:
            call, block = calls[key], blocks[key]
            start = time.perf_counter()
            for _ in range(block):
                call()
            times[key].append((time.perf_counter() - start) / block)
    return {key: STATISTIC(t) for key, t in times.items()}


def no_grad(call):
    def run():
        with torch.no_grad():
            return call()
    return run


def training_step(layer: nn.Module, x: torch.Tensor):
    """Forward + backward to every parameter requiring grad (nothing accumulates in ``.grad``)."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        y = layer(x)
        return torch.autograd.grad(y, params, grad_outputs=torch.ones_like(y))
    return run


def measure_site(layer: tf.TensorLinear, dense: nn.Linear, x: torch.Tensor) -> dict:
    """One site's ratios, routes and FLOPs (module docstring, ``tensor-forward-sites``); ``layer`` takes the default
    (measured) choice, a copy of it the FLOP model's."""
    rows = x.shape[0]
    before = copy.deepcopy(layer)
    before.CONTRACTION_COST = 3.0  # an instance attribute: this copy chooses by the previous FLOP model
    with torch.no_grad():  # all routes compute the layer's own weight
        expected = x @ layer.to_dense().T + layer.bias
        for y in (torch.nn.functional.linear(x, layer.to_dense(), layer.bias), layer._apply_weight(x) + layer.bias,
                  layer._planned(x) + layer.bias, layer(x), before(x)):
            assert torch.allclose(y, expected, atol=1e-4, rtol=1e-3)
        reference = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
        scale = float(reference.abs().max())
        errors = {route: float((y + layer.bias - reference).abs().max()) / scale
                  for route, y in (("contraction", layer._apply_weight(x)), ("planned", layer._planned(x)))}
    t = interleaved_medians({
        "dense": no_grad(lambda: dense(x)), "inference_before": no_grad(lambda: before(x)),
        "inference_after": no_grad(lambda: layer(x)),
        "dense_training": lambda: dense(x), "training_before": lambda: before(x), "training_after": lambda: layer(x),
        "dense_step": training_step(dense, x), "step_before": training_step(before, x),
        "step_after": training_step(layer, x),
        "reconstruct_uncached": no_grad(lambda: torch.nn.functional.linear(x, layer.to_dense(), layer.bias)),
        "contraction": no_grad(lambda: layer._apply_weight(x)), "planned": no_grad(lambda: layer._planned(x)),
    }, PAIRED_ROUNDS)
    counts = layer.flop_counts(rows)
    dense_flops = rows * counts["dense_per_row"]
    measured = {("cached" if cached else "uncached"): layer.measured_routes(rows, cached) for cached in (True, False)}
    return {
        "rows": rows, "dense_ms": 1e3 * t["dense"],
        **{f"{kind}_{when}": t[f"{kind}_{when}"] / t[ref]
           for kind, ref in (("inference", "dense"), ("training", "dense_training"), ("step", "dense_step"))
           for when in ("before", "after")},
        **{route: t[route] / t["dense"] for route in ("reconstruct_uncached", "contraction", "planned")},
        "routes_before": {"cached": before.route(rows, cached=True), "uncached": before.route(rows, cached=False)},
        "routes_after": {"cached": layer.route(rows, cached=True), "uncached": layer.route(rows, cached=False)},
        "measured_ms": {k: {r: round(1e3 * v, 4) for r, v in e["times"].items()} for k, e in measured.items() if e},
        "flops": {"dense": dense_flops, "to_dense": counts["reconstruct"],
                  "reconstruct_uncached": counts["reconstruct"] + dense_flops,
                  "contraction": rows * counts["contraction_per_row"], "planned": counts.get("planned")},
        "route_rel_error": errors,
    }


def forward_sites(fmt: str) -> dict:
    """Every site of SITES in one format: shape, ranks, parameter ratio and ``measure_site``'s entries."""
    sites = {}
    for seed, (site, (shape, rows)) in enumerate(SITES.items()):
        W = WEIGHTS[site[4:]] if site.startswith("vit.") else weight_like(*shape, seed=10 + seed)
        g = torch.Generator().manual_seed(seed)
        bias, x = 0.1 * torch.randn(shape[0], generator=g), torch.randn(rows, shape[1], generator=g)
        _, _, ranks, ratio = site_ranks(fmt, shape)
        layer = factorized_layer(fmt, W, bias)
        sites[site] = {"shape": list(shape), "ranks": list(ranks), "param_ratio": round(ratio, 4),
                       **measure_site(layer, dense_layer(W, bias), x), "layer": layer, "x": x}
    return sites


@pytest.mark.benchmark(group="tensor-forward-sites")
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_sites(benchmark, single_thread, fmt):
    pytest.importorskip("opt_einsum")
    sites = forward_sites(fmt)
    layers = {site: entry.pop("layer") for site, entry in sites.items()}
    inputs = {site: entry.pop("x") for site, entry in sites.items()}
    with torch.no_grad():
        benchmark(run_block, layers, inputs)
    info = benchmark.extra_info
    info["sites"] = sites
    info["inference_ratio_max"] = max(s["inference_after"] for s in sites.values())
    info["inference_ratio_max_before"] = max(s["inference_before"] for s in sites.values())
    info["target_met"] = info["inference_ratio_max"] <= INFERENCE_TARGET
    assert all(0.5 * RATIO < s["param_ratio"] <= RATIO for s in sites.values())


def table(results: dict[str, dict]) -> str:
    """A markdown table of ``forward_sites`` results per format: FLOPs (M) of each route, the routes taken (cached /
    uncached) and the time ratios to dense, before -> after."""
    rows = ["| format | site | rows | p.ratio | FLOPs M: dense / rec. uncached / contraction / planned "
            "| routes before (cached/grad) | routes after | inference | training fwd | training fwd+bwd "
            "| forced: contraction / planned | max rel err c / p |",
            "|" + "---|" * 11]
    short = {"reconstruct": "rec", "contraction": "con", "planned": "plan", "kronecker": "kron"}
    for fmt, sites in results.items():
        for site, s in sites.items():
            f = s["flops"]
            flops = " / ".join("-" if f[k] is None else f"{f[k] / 1e6:.1f}"
                               for k in ("dense", "reconstruct_uncached", "contraction", "planned"))

            def pair(kind, s=s):
                return f"{s[kind + '_before']:.2f} -> {s[kind + '_after']:.2f}"

            routes = {when: "/".join(short[s[f"routes_{when}"][c]] for c in ("cached", "uncached"))
                      for when in ("before", "after")}
            e = s["route_rel_error"]
            rows.append(f"| {fmt} | {site} | {s['rows']} | {s['param_ratio']:.2f} | {flops} | {routes['before']} "
                        f"| {routes['after']} | {pair('inference')} | {pair('training')} | {pair('step')} "
                        f"| {s['contraction']:.2f} / {s['planned']:.2f} "
                        f"| {e['contraction']:.1e} / {e['planned']:.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    block = torch.empty((32 << 20) - (1 << 16), dtype=torch.uint8)  # as ``settled_allocator``
    block.fill_(0)
    del block
    args = sys.argv[1:]
    if "--min" in args:  # the minimum over the rounds: steadier than the median on a loaded machine
        STATISTIC = min
        args.remove("--min")
    results = {}
    for fmt in args or FORMATS:
        results[fmt] = forward_sites(fmt)
        print(table({fmt: results[fmt]}).split("\n", 2)[-1] if len(results) > 1 else table(results), flush=True)
