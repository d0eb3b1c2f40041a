"""The forward routes of the tensorized layers (``rankbench.kinds.tensor_formats.TensorLinear``): reconstruct-then-GEMM
(with the dense weight cached when no gradient is needed), the hand-written contraction, and the opt_einsum-planned
contraction. Known answers: every route equals y = x W^T + b with W rebuilt here from the factors by one plain
``torch.einsum`` in float64 (independent of the layers' own ``to_dense``), and in float32 every route equals the
reconstruct route to 1e-6 of the largest output; in deterministic mode the route taken is the cheapest by the
documented FLOP rule (``route_costs``), whose counts are checked against closed forms; otherwise it is the fastest
of the timed routes (times stubbed here: no timing is asserted), timed once per key and process; the cached weight
follows every change of the factors (optimizer steps, in-place edits, swapped factor lists, ``load_state_dict``,
``.to``)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from rankbench.kinds import tensor_formats as tf

FORMATS = ("cp", "tucker", "tt", "ttm")
OUT_DIMS, IN_DIMS = (4, 3), (2, 5)  # W: 12 x 10
RANKS = {"cp": 5, "tucker": (3, 2, 2, 3), "tt": (3, 4, 3), "ttm": (3,)}


def gaussian(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_layer(name: str, dtype=torch.float64, out_dims=OUT_DIMS, in_dims=IN_DIMS, ranks=None) -> tf.TensorLinear:
    W = gaussian(math.prod(out_dims), math.prod(in_dims))
    bias = gaussian(W.shape[0], seed=1)
    fit = {"cp": tf.fit_cp, "tucker": tf.fit_tucker, "tt": tf.fit_tt, "ttm": tf.fit_ttm}[name]
    rank_arg = {"cp": "rank"}.get(name, "ranks")
    layer = fit(W, out_dims, in_dims, **{rank_arg: RANKS[name] if ranks is None else ranks}, bias=bias)
    return layer.to(dtype)


def reference_weight(layer: tf.TensorLinear, tensors=None) -> torch.Tensor:
    """W from the factors by one einsum in float64, written out per format (not the layer's ``to_dense``);
    ``tensors``: stand-ins for ``layer._factor_tensors()`` (detached float64 copies by default)."""
    p = len(layer.out_dims)
    f64 = [t.detach().double() for t in layer._factor_tensors()] if tensors is None else tensors
    if layer.format_name == "cp":
        *factors, lam = f64
        letters = "abcd"[: len(factors)]
        T = torch.einsum(",".join(c + "r" for c in letters) + ",r->" + letters, *factors, lam)
    elif layer.format_name == "tucker":
        core, *factors = f64
        T = torch.einsum("pqst,ap,bq,cs,dt->abcd", core, *factors)
    elif layer.format_name == "tt":
        T = torch.einsum("xap,pbq,qcs,sdy->abcd", *f64).reshape(*layer.out_dims, *layer.in_dims)
    else:  # ttm: G_1[o_1, i_1] G_2[o_2, i_2], W[(o_1 o_2), (i_1 i_2)]
        T = torch.einsum("xacp,pbdy->abcd", *f64)
    assert p == 2
    return T.reshape(layer.out_features, layer.in_features)


def reference_output(layer: tf.TensorLinear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ reference_weight(layer).T + layer.bias.detach().double()


def force_route(monkeypatch, route: str) -> None:
    monkeypatch.setattr(tf.TensorLinear, "route", lambda self, rows, cached=False: route)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` (the harness's ``--deterministic``) for one test."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture
def fresh_measurements(monkeypatch):
    """An empty route wisdom (the process table, backed by this test's own cache folder), restored afterwards."""
    wisdom = tf.RouteWisdom()
    monkeypatch.setattr(tf, "ROUTE_WISDOM", wisdom)
    return wisdom


def stub_times(monkeypatch, times: dict[str, float]) -> list:
    """Replace the route timing by fixed seconds per route; returns the list of (layer, rows, cached) timed."""
    calls = []

    def fake(self, rows, cached):
        calls.append((self, rows, cached))
        return {route: t for route, t in times.items() if route != "planned" or self._plan(rows) is not None}

    monkeypatch.setattr(tf.TensorLinear, "_time_routes", fake)
    return calls


# --- outputs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["reconstruct", "contraction", "planned"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_every_route_equals_the_float64_reconstruction(name, grad, route, monkeypatch):
    """float64 layers: each route, with and without autograd (cached / rebuilt weight), within 1e-12 of x W^T + b."""
    pytest.importorskip("opt_einsum")
    layer = make_layer(name)
    x = gaussian(7, 3, 10, seed=2)
    force_route(monkeypatch, route)
    with torch.set_grad_enabled(grad):
        y = layer(x)
        y_again = layer(x)  # the second call reads the cached weight (no grad) or rebuilds it (grad)
    expected = reference_output(layer, x.reshape(-1, 10)).reshape(7, 3, 12)
    assert y.shape == (7, 3, 12)
    assert (y - expected).abs().max() < 1e-12
    assert torch.equal(y, y_again)
    assert y.requires_grad == grad


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("shape", [(OUT_DIMS, IN_DIMS), ((3,), (2, 5)), ((2, 2, 3), (10,))])
def test_tucker_kronecker_route_equals_the_float64_reconstruction(shape, grad, monkeypatch):
    """Tucker's Kronecker rebuild (K_out G K_in^T), with any number of output / input modes, is the same weight."""
    out_dims, in_dims = shape
    ranks = {2: (3, 2), 3: (2, 2, 3)}.get(len(out_dims) + len(in_dims), RANKS["tucker"])
    layer = make_layer("tucker", out_dims=out_dims, in_dims=in_dims, ranks=ranks)
    x = gaussian(6, 10, seed=13)
    force_route(monkeypatch, "kronecker")
    with torch.set_grad_enabled(grad):
        y = layer(x)
    W = layer.to_dense().detach()
    assert (y.detach() - (x @ W.T + layer.bias.detach())).abs().max() < 1e-12
    assert (layer._to_dense_kronecker().detach() - W).abs().max() < 1e-12
    if grad:  # gradients as through to_dense
        y.square().sum().backward()
        grads = [t.grad.clone() for t in layer._factor_tensors()]
        layer.zero_grad()
        (x @ layer.to_dense().T + layer.bias).square().sum().backward()
        for g, t in zip(grads, layer._factor_tensors()):
            torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-12)


VIT_QKV = ((16, 12), (8, 8), {"cp": 136, "tucker": (9, 9, 8, 8), "tt": (16, 22, 8), "ttm": (27,)})  # 192 x 64, ranks of
# benchmarks/pytest/test_tensor_layers.py at param_ratio 0.5


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name,route", [(name, route) for name in FORMATS for route in ("contraction", "planned")]
                         + [("tucker", "kronecker")])
def test_float32_routes_equal_the_reconstruct_route_to_1e6(name, route, grad, monkeypatch):
    """float32 on the ViT qkv shape (192 x 64, 2176 rows) at about half the parameters: each contraction route, with
    and without autograd, within 1e-6 of the largest output of the reconstruct route (association only)."""
    pytest.importorskip("opt_einsum")
    out_dims, in_dims, ranks = VIT_QKV
    layer = make_layer(name, dtype=torch.float32, out_dims=out_dims, in_dims=in_dims, ranks=ranks[name])
    assert layer.weight_params <= 0.5 * 192 * 64
    x = gaussian(128, 17, 64, seed=12, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
    force_route(monkeypatch, route)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert y.requires_grad == grad
    assert (y.detach() - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("name", FORMATS)
def test_float32_outputs_equal_the_previous_forward_to_1e6(name):
    """float32, whatever route the default (measured) choice takes: the forward without grad and with grad equals the
    previous implementation's F.linear(x, to_dense()) + b to 1e-6 of the largest output, and the float64
    reconstruction to float32 rounding."""
    layer = make_layer(name, dtype=torch.float32)
    x = gaussian(64, 10, seed=3, dtype=torch.float32)
    previous = torch.nn.functional.linear(x, layer.to_dense().detach()) + layer.bias.detach()
    with torch.no_grad():
        cached = layer(x)
    trained = layer(x).detach()
    assert (cached - previous).abs().max() <= 1e-6 * previous.abs().max()
    assert (trained - previous).abs().max() <= 1e-6 * previous.abs().max()
    assert (cached.double() - reference_output(layer, x)).abs().max() < 1e-5


# --- the route choice ----------------------------------------------------------------------------------------------


def test_flop_counts_match_closed_forms():
    """CP (rank R): contraction 2 R (in + out) per row, reconstruction 2 out R in (the Khatri-Rao products are
    elementwise, not counted), dense 2 in out per row. TT on (4, 4) x (4, 4) at rank 1, n rows: the optimal order
    pairs the output cores (an outer product of two 4-vectors, 2 x 16) and the input cores (2 x 16), contracts x
    with the input pair (2 n 16) and expands with the output pair (2 n 16) -- cheaper than core by core."""
    pytest.importorskip("opt_einsum")
    cp = make_layer("cp")
    c = cp.flop_counts(rows=9)
    assert c["contraction_per_row"] == 2 * 5 * (10 + 12)
    assert c["reconstruct"] == 2 * 12 * 5 * 10
    assert c["dense_per_row"] == 2 * 12 * 10
    tt = make_layer("tt", out_dims=(4, 4), in_dims=(4, 4), ranks=(1, 1, 1))
    n = 32
    assert tt.flop_counts(rows=n)["planned"] == 2 * 16 + 2 * 16 + 2 * n * 16 + 2 * n * 16


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_route_is_the_cheapest_by_the_documented_costs(name, cached, deterministic, fresh_measurements, monkeypatch):
    """Deterministic mode: route() = argmin of: reconstruct (to_dense FLOPs, 0 when cached, + rows x dense row),
    contraction and planned (their FLOPs x FLOP_MODEL_COST); checked against the counts, not against route_costs'
    own formula. Nothing is timed."""
    pytest.importorskip("opt_einsum")
    timed = stub_times(monkeypatch, {"reconstruct": 3.0, "contraction": 2.0, "planned": 1.0})
    for rows in (1, 16, 400):
        layer = make_layer(name)
        c = layer.flop_counts(rows)
        k = tf.TensorLinear.FLOP_MODEL_COST
        costs = {"reconstruct": (0 if cached else c["reconstruct"]) + rows * c["dense_per_row"],
                 "contraction": k * rows * c["contraction_per_row"], "planned": k * c["planned"]}
        best = min(costs.values())
        chosen = layer.route(rows, cached=cached)
        assert costs[chosen] == best
        assert chosen == next(r for r in ("reconstruct", "contraction", "planned") if costs[r] == best)
        assert chosen == layer.flop_route(rows, cached=cached)
    assert timed == [] and fresh_measurements.entries() == {}


@pytest.mark.parametrize("name", FORMATS)
def test_measured_choice_is_the_fastest_route_with_a_margin_for_reconstruct(name, fresh_measurements, monkeypatch):
    """Default mode: the fastest timed route, except that a contraction must beat reconstruct by MEASURE_MARGIN."""
    pytest.importorskip("opt_einsum")
    stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.5, "planned": 0.7})
    assert make_layer(name).route(16, cached=True) == "contraction"
    stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.9, "planned": 0.6})
    assert make_layer(name).route(17, cached=False) == "planned"  # 17 rows: another key (rows bucket 32)
    stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.97, "planned": 1.5})  # within the 5% margin
    assert make_layer(name).route(100, cached=True) == "reconstruct"
    entry = make_layer(name).measured_routes(100, cached=True)
    assert entry == {"route": "reconstruct", "times": {"reconstruct": 1.0, "contraction": 0.97, "planned": 1.5},
                     "rows": 100}


def test_measured_choice_is_made_once_per_key_and_shared(fresh_measurements, monkeypatch):
    """One timing per (class, dims, factor shapes, rows bucket, cached, grads, dtype, device, threads), shared by all
    layers of that key and reused on later calls; a new rows bucket, cached flag, format or dtype times again."""
    pytest.importorskip("opt_einsum")
    timed = stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.5, "planned": 0.7})
    first, second = make_layer("tt"), make_layer("tt")
    x = gaussian(40, 10, seed=11)
    with torch.no_grad():
        y = first(x)
        for _ in range(3):
            first(x), second(x)
    first.route(33, cached=True), second.route(64, cached=True)  # 33..64 rows: the same bucket as 40
    assert [(rows, cached) for _, rows, cached in timed] == [(40, True)]
    assert (y - reference_output(first, x)).abs().max() < 1e-12  # the contraction the stub made fastest
    assert first.__dict__["_routes"] == {(40, True, True, torch.get_num_threads(), None): "contraction",
                                         (33, True, True, torch.get_num_threads(), None): "contraction"}
    first(x)  # grad enabled, factors require grad: the uncached key
    second.route(65, cached=True)  # bucket 128
    make_layer("ttm").route(40, cached=True)  # another class
    make_layer("tt", dtype=torch.float32).route(40, cached=True)  # another dtype
    assert [(rows, cached) for _, rows, cached in timed] == [(40, True), (40, False), (65, True), (40, True),
                                                             (40, True)]
    assert len(fresh_measurements.entries()) == 5


def test_a_measured_choice_persists_on_disk_for_later_processes(fresh_measurements, monkeypatch, tmp_path):
    """The machine's route wisdom: a later process (an empty process table) reuses the choice from the disk without
    timing; another cache root (another machine's wisdom) times again; a damaged file counts as empty."""
    pytest.importorskip("opt_einsum")
    monkeypatch.setenv("RANKBENCH_CACHE", str(tmp_path / "cache"))
    timed = stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.5, "planned": 0.7})
    with torch.no_grad():
        make_layer("tt")(gaussian(40, 10, seed=1))
    path = tf.ROUTE_WISDOM.path()
    assert path.is_file() and len(timed) == 1
    fresh_measurements.forget()  # a new process: nothing measured in memory
    timed.clear()
    later = make_layer("tt")
    assert later.route(40, cached=True) == "contraction" and timed == []
    monkeypatch.setenv("RANKBENCH_CACHE", str(tmp_path / "elsewhere"))
    fresh_measurements.forget()
    assert make_layer("tt").route(40, cached=True) == "contraction" and len(timed) == 1
    path.write_text("{not json")
    monkeypatch.setenv("RANKBENCH_CACHE", str(tmp_path / "cache"))
    fresh_measurements.forget()
    make_layer("tt").route(40, cached=True)
    assert len(timed) == 2 and tf.ROUTE_WISDOM.get(make_layer("tt")._measure_key(40, True))["route"] == "contraction"


def test_measured_choice_is_skipped_where_timing_is_impossible(fresh_measurements, monkeypatch):
    """Where timing is impossible (here: under torch.compile tracing) nothing is timed or stored: the FLOP model
    decides that call only."""
    timed = stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.5, "planned": 0.7})
    layer = make_layer("cp")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert layer.route(8, cached=True) == layer.flop_route(8, cached=True)
    assert timed == [] and fresh_measurements.entries() == {} and not layer.__dict__.get("_routes")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert layer.route(8, cached=True) == "contraction"
    assert len(timed) == 1


def test_deterministic_mode_keeps_the_flop_choice_even_after_a_measurement(fresh_measurements, monkeypatch):
    pytest.importorskip("opt_einsum")
    stub_times(monkeypatch, {"reconstruct": 1.0, "contraction": 0.1, "planned": 0.2})
    layer = make_layer("tucker", out_dims=(16, 16), in_dims=(16, 16), ranks=(16, 16, 16, 16))
    assert layer.route(64, cached=True) == "contraction"
    torch.use_deterministic_algorithms(True)
    try:
        assert layer.route(64, cached=True) == layer.flop_route(64, cached=True) == "reconstruct"
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(tf.TensorLinear, "CONTRACTION_COST", 3.0)  # a number: the FLOP model, untimed
    assert make_layer("tucker", out_dims=(16, 16), in_dims=(16, 16), ranks=16).route(64, cached=True) == "reconstruct"


@pytest.mark.parametrize("cached", [False, True])
def test_real_timing_covers_every_route_and_leaves_no_trace(cached, fresh_measurements):
    """The real timer: a finite positive time per route, no gradient accumulated, the RNG untouched, and the chosen
    route one of them (which one is not asserted: it depends on the machine)."""
    pytest.importorskip("opt_einsum")
    layer = make_layer("tt")
    rng = torch.get_rng_state()
    entry = layer.measured_routes(24, cached=cached)
    assert set(entry["times"]) == {"reconstruct", "contraction", "planned"}
    assert all(0 < t < math.inf for t in entry["times"].values())
    assert entry["route"] in entry["times"] and entry["rows"] == 24
    assert all(p.grad is None for p in layer.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert ("_dense_cache" in layer.__dict__) == cached
    tucker = make_layer("tucker")
    assert set(tucker.measured_routes(24, cached=cached)["times"]) == (
        {"reconstruct", "contraction", "planned"} | (set() if cached else {"kronecker"}))


def test_a_low_rank_layer_contracts_and_a_full_rank_one_reconstructs(deterministic):
    """TT at rank 1 on 256 x 256 costs ~1/500 of the dense product per row: contraction / planned even with the
    weight cached; at full rank the contraction costs more than the GEMM, so a cached layer reconstructs."""
    pytest.importorskip("opt_einsum")
    thin = make_layer("tt", out_dims=(16, 16), in_dims=(16, 16), ranks=(1, 1, 1))
    assert thin.route(64, cached=True) in ("contraction", "planned")
    assert thin.route(64, cached=False) in ("contraction", "planned")
    full = make_layer("tt", out_dims=(16, 16), in_dims=(16, 16), ranks=(16, 256, 16))
    assert full.route(64, cached=True) == "reconstruct"


def test_without_opt_einsum_there_is_no_planned_route(monkeypatch, fresh_measurements):
    import sys

    monkeypatch.setitem(sys.modules, "opt_einsum", None)  # import opt_einsum -> ImportError
    layer = make_layer("ttm")
    assert "planned" not in layer.route_costs(50)
    assert layer.route(50) in ("reconstruct", "contraction")
    assert set(layer.measured_routes(50)["times"]) == {"reconstruct", "contraction"}
    x = gaussian(50, 10, seed=4)
    assert (layer(x).detach() - reference_output(layer, x)).abs().max() < 1e-12


# --- the cached dense weight -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_cache_is_reused_without_grad_and_never_with_grad(name, monkeypatch):
    layer = make_layer(name)
    force_route(monkeypatch, "reconstruct")
    x = gaussian(5, 10, seed=5)
    builds = []
    original = type(layer).to_dense
    monkeypatch.setattr(type(layer), "to_dense", lambda self: builds.append(1) or original(self))
    with torch.no_grad():
        layer(x), layer(x), layer(x)
    assert len(builds) == 1
    assert layer.cached_dense() is layer.cached_dense()
    y = layer(x)  # grad enabled and factors require grad: rebuilt, differentiable
    assert len(builds) == 2 and y.requires_grad
    y.square().sum().backward()
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in layer._factor_tensors()]
    (x @ reference_weight(layer, leaves).T + layer.bias.detach()).square().sum().backward()
    for t, leaf in zip(layer._factor_tensors(), leaves):
        if t.requires_grad:
            torch.testing.assert_close(t.grad, leaf.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FORMATS)
def test_cache_follows_an_optimizer_step(name, monkeypatch):
    """Eval forward (cached), train step (grad forward + backward + Adam step), eval forward: the output is the one
    of the new factors, not of the cached old weight."""
    layer = make_layer(name)
    force_route(monkeypatch, "reconstruct")
    x = gaussian(16, 10, seed=6)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    assert (before - reference_output(layer, x)).abs().max() < 1e-12
    layer.train()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    loss = layer(x).square().mean()
    loss.backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
    assert (after - before).abs().max() > 1e-3
    assert (after - reference_output(layer, x)).abs().max() < 1e-12


@pytest.mark.parametrize("name", FORMATS)
def test_cache_follows_in_place_edits_swaps_loads_and_dtype(name, monkeypatch):
    layer = make_layer(name)
    force_route(monkeypatch, "reconstruct")
    x = gaussian(8, 10, seed=7)

    def check():
        with torch.no_grad():
            y = layer(x.to(layer.bias.dtype))
        assert (y.double() - reference_output(layer, x)).abs().max() < (1e-12 if y.dtype == torch.float64 else 1e-4)

    check()
    with torch.no_grad():  # an in-place edit (like BayesTensorLinear's masks)
        layer._factor_tensors()[1].mul_(0.5)
    check()
    key = "factors" if name in ("cp", "tucker") else "cores"  # a factor list swapped for other tensors (Pyro draws)
    swapped = [2.0 * t.detach() for t in tf._tensors(getattr(layer, key))]
    layer.__dict__[key] = swapped
    check()
    del layer.__dict__[key]
    check()
    other = make_layer(name)
    with torch.no_grad():  # load_state_dict copies in place
        other._factor_tensors()[0].add_(1.0)
    layer.load_state_dict(other.state_dict())
    check()
    layer.float()
    assert layer.cached_dense().dtype == torch.float32
    check()


@pytest.mark.parametrize("name", FORMATS)
def test_cache_is_no_state(name):
    """No new parameters / buffers / state_dict entries; pickles and deep copies drop the cache and still work."""
    layer = make_layer(name)
    keys = set(layer.state_dict())
    params = layer.params
    x = gaussian(4, 10, seed=8)
    with torch.no_grad():
        layer(x)
    assert "_dense_cache" in layer.__dict__ or layer.route(4, cached=True) != "reconstruct"
    assert set(layer.state_dict()) == keys and layer.params == params
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_dense_cache" not in clone.__dict__ and "_plans" not in clone.__dict__
        with torch.no_grad():
            assert torch.equal(clone(x), layer(x))


def test_tensors_of_a_parameter_list_are_its_parameters():
    layer = make_layer("tt")
    assert all(a is b for a, b in zip(tf._tensors(layer.cores), list(layer.cores)))
    assert len(tf._tensors(layer.cores)) == len(layer.cores)


def test_cache_under_inference_mode_then_no_grad_then_training():
    """A weight cached under inference_mode serves later no_grad calls; a grad forward still trains the factors and
    the next inference_mode call sees the step."""
    layer = make_layer("tt")
    x = gaussian(5, 10, seed=9)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    layer(x).square().sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    with torch.inference_mode():
        after = layer(x)
    expected = reference_output(layer, x)
    assert (after - first).abs().max() > 1e-3
    assert (after - expected).abs().max() < 1e-12 * expected.abs().max()
