"""Tests for the spectral selectors: uniform, energy, effective-rank, oht, evbmf."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

from rankbench.api import PARAM_RATIO, RANK_CAP, RANK_TOTAL, PluginParams, RankProblem, Selector, Site
from rankbench_plugins.selectors import effective_rank, energy, evbmf, oht, uniform
from rankbench_plugins.selectors._spectral import energy_fractions, round_half_up, unfolding_dims

MODULES = {"uniform": uniform, "energy": energy, "effective-rank": effective_rank, "oht": oht, "evbmf": evbmf}


def selector_class(name: str) -> type[Selector]:
    registered = []
    MODULES[name].rankbench_register_selectors(registered.append)
    assert len(registered) == 1
    return registered[0]


def make(name: str, **params) -> Selector:
    cls = selector_class(name)
    return cls(cls.Params(**params))


def planted(m: int, n: int, r: int, sigma: float, seed: int, snr: tuple[float, float] = (3.0, 6.0)) -> np.ndarray:
    """X = U diag(s) V^T + sigma Z; the signal singular values lie at snr x the noise edge sigma (sqrt m + sqrt n)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    s = edge * np.linspace(snr[1], snr[0], r)
    return (u * s) @ v.T + sigma * rng.standard_normal((m, n))


def matrix_site(x: np.ndarray, name: str = "W", **kw) -> Site:
    return Site(name=name, shape=x.shape, singular_values=np.linalg.svd(x, compute_uv=False), **kw)


def spectrum_site(s, shape, name: str = "W", **kw) -> Site:
    return Site(name=name, shape=tuple(shape), singular_values=np.asarray(s, dtype=float), **kw)


def tensor_site(t: np.ndarray, name: str = "T", **kw) -> Site:
    spectra = [
        np.linalg.svd(np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1), compute_uv=False) for mode in range(t.ndim)
    ]
    return Site(name=name, shape=t.shape, mode_singular_values=spectra, **kw)


def problem(sites, budget=None, kind=None) -> RankProblem:
    return RankProblem(sites=list(sites), budget=budget, budget_kind=kind, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Registration and class attributes


@pytest.mark.parametrize("name", sorted(MODULES))
def test_registered_class_contract(name):
    cls = selector_class(name)
    assert issubclass(cls, Selector)
    assert cls.name == name and cls.version == "1"
    assert cls.description and "\n" not in cls.description
    assert issubclass(cls.Params, PluginParams) and cls.Params is not PluginParams
    cls()  # every parameter has a default
    with pytest.raises(ValidationError):
        cls.Params(not_a_parameter=1)
    assert MODULES[name].__doc__ and len(MODULES[name].__doc__) > 200  # names the paper and the equations


def test_uses_budget():
    kinds = [PARAM_RATIO, RANK_CAP, RANK_TOTAL, None]
    assert [make("uniform").uses_budget(k) for k in kinds] == [True, True, True, False]
    assert None not in selector_class("uniform").budget_kinds  # nothing to go on without a budget: skipped
    assert [make("energy").uses_budget(k) for k in kinds] == [True, False, False, False]
    for name in ("effective-rank", "oht", "evbmf"):
        assert not any(make(name).uses_budget(k) for k in kinds)


# --------------------------------------------------------------------------------------------------------------
# Planted rank: oht and evbmf recover the true rank of low rank + white noise


PLANTED = [(200, 100, 5, 1.0), (300, 300, 10, 0.05), (100, 250, 7, 3.0)]


@pytest.mark.parametrize(("m", "n", "r", "sigma"), PLANTED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_rank_oht_and_evbmf(m, n, r, sigma, seed):
    x = planted(m, n, r, sigma, seed)
    unknown = problem([matrix_site(x)])
    known = problem([matrix_site(x, noise_sigma=sigma)])
    assert make("oht").select(unknown) == {"W": r}
    assert make("oht").select(known) == {"W": r}
    assert make("oht", sigma=sigma).select(unknown) == {"W": r}
    assert make("evbmf").select(unknown) == {"W": r}
    assert make("evbmf", sigma2=sigma**2).select(unknown) == {"W": r}


def test_evbmf_estimates_the_noise_variance():
    for seed in range(3):
        x = planted(200, 120, 6, 0.3, seed)
        s = np.linalg.svd(x, compute_uv=False)
        assert evbmf.evbmf_sigma2(s, x.shape) == pytest.approx(0.09, rel=0.05)
        # transposing the matrix changes nothing
        assert evbmf.evbmf_sigma2(s, x.shape[::-1]) == evbmf.evbmf_sigma2(s, x.shape)


def test_evbmf_is_scale_invariant():
    s = np.linalg.svd(planted(150, 90, 4, 1.0, 7), compute_uv=False)
    for scale in (1e-6, 1e-3, 1e4):
        assert evbmf.evbmf_rank(s * scale, (150, 90)) == 4
        assert evbmf.evbmf_sigma2(s * scale, (150, 90)) == pytest.approx(evbmf.evbmf_sigma2(s, (150, 90)) * scale**2)


def test_planted_multilinear_rank_per_mode():
    rng = np.random.default_rng(3)
    shape, ranks, sigma = (20, 30, 25), (3, 4, 2), 0.1
    core = rng.standard_normal(ranks) * 60.0
    factors = [np.linalg.qr(rng.standard_normal((d, r)))[0] for d, r in zip(shape, ranks)]
    t = np.einsum("abc,ia,jb,kc->ijk", core, *factors) + sigma * rng.standard_normal(shape)
    site = tensor_site(t)
    for sel in (make("oht"), make("oht", sigma=sigma), make("evbmf")):
        assert sel.select(problem([site])) == {"T": ranks}


def test_oht_pure_noise_gives_rank_one_and_sigma_override():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((120, 80))
    assert make("oht").select(problem([matrix_site(noise)])) == {"W": 1}
    assert make("evbmf").select(problem([matrix_site(noise)])) == {"W": 1}
    x = planted(120, 80, 4, 1.0, 1)
    # a wrong site noise level is overridden by the parameter
    site = matrix_site(x, noise_sigma=100.0)
    assert make("oht").select(problem([site])) == {"W": 1}
    assert make("oht", sigma=1.0).select(problem([site])) == {"W": 4}


# --------------------------------------------------------------------------------------------------------------
# oht: the threshold coefficients


def test_lambda_star_square_is_four_over_root_three():
    assert oht.lambda_star(1.0) == pytest.approx(4 / math.sqrt(3), abs=1e-14)


def test_marchenko_pastur_median_is_the_median():
    for beta in (0.05, 0.3, 0.5, 1.0):
        mu = oht.marchenko_pastur_median(beta)
        a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
        assert a < mu < b
        assert oht.marchenko_pastur_cdf(mu, beta) == pytest.approx(0.5, abs=1e-10)
        # the density integrates to 1 (up to the quadrature's reach just below the upper edge)
        assert oht.marchenko_pastur_cdf(b - 1e-12, beta) == pytest.approx(1.0, abs=1e-6)
    assert oht.marchenko_pastur_median(1.0) == pytest.approx(0.6528, abs=1e-4)
    with pytest.raises(ValueError):
        oht.marchenko_pastur_median(1.5)


def test_marchenko_pastur_median_matches_random_matrices():
    # eigenvalues of Z Z^T / N for a p x N Gaussian Z follow MP(beta = p/N)
    rng = np.random.default_rng(0)
    p, n = 400, 800
    eig = np.linalg.svd(rng.standard_normal((p, n)), compute_uv=False) ** 2 / n
    assert np.median(eig) == pytest.approx(oht.marchenko_pastur_median(p / n), abs=0.01)


def test_omega_exact_agrees_with_cubic_approximation():
    for beta in np.round(np.arange(0.1, 1.0001, 0.1), 10):
        assert oht.omega(beta) == pytest.approx(oht.omega_approx(beta), abs=0.02)
    assert oht.omega(1.0) == pytest.approx(2.858, abs=1e-3)


def test_oht_known_sigma_uses_the_larger_dimension():
    s = np.array([50.0, 30.0, 24.0, 10.0, 1.0])
    # beta = 1/4, N = 400: tau = lambda*(1/4) * 20 * sigma
    tau = oht.lambda_star(0.25) * 20.0
    assert oht.oht_threshold(s, (100, 400), 1.0) == pytest.approx(tau)
    assert oht.oht_threshold(s, (400, 100), 1.0) == pytest.approx(tau)
    assert oht.oht_rank(s, (100, 400), 1.0) == int(np.sum(s > tau))


def test_oht_matches_optht_package():
    optht = pytest.importorskip("optht")
    for (m, n, r, sigma), seed in itertools.product(PLANTED, range(2)):
        s = np.linalg.svd(planted(m, n, r, sigma, seed), compute_uv=False)
        assert oht.oht_rank(s, (m, n)) == int(optht.optht(min(m, n) / max(m, n), sv=s))
        if m == n:  # optht's known-sigma threshold uses sqrt(len(sv)) = sqrt(min(m, n)); same as N only if square
            assert oht.oht_rank(s, (m, n), sigma) == int(optht.optht(1.0, sv=s, sigma=sigma))


# --------------------------------------------------------------------------------------------------------------
# uniform


@pytest.mark.parametrize(
    ("m", "n", "rho", "k"),
    [
        (4096, 4096, 0.8, 1638),  # floor(0.8 * 4096 / 2)
        (4096, 11008, 0.5, 1492),  # floor(0.5 * 4096 * 11008 / 15104)
        (768, 3072, 0.2, 122),  # floor(0.2 * 768 * 3072 / 3840)
        (100, 30, 0.9, 20),  # floor(0.9 * 3000 / 130)
        (50, 50, 0.001, 1),  # below one rank: clipped to 1
    ],
)
def test_uniform_param_ratio_formula(m, n, rho, k):
    assert k == max(1, math.floor(rho * m * n / (m + n)))
    site = Site(name="W", shape=(m, n))  # no spectrum needed
    assert make("uniform").select(problem([site], rho, PARAM_RATIO)) == {"W": k}


def test_uniform_param_ratio_custom_cost_and_several_sites():
    # a cost with an extra k x k core: k(m+n) + k^2 <= 0.3 * 60 * 40 = 720  ->  k = 7 (700 + 49 = 749 > 720: 6)
    core = Site(name="core", shape=(60, 40), params_at_rank=lambda k: k * 100 + k * k)
    plain = Site(name="plain", shape=(60, 40))
    ranks = make("uniform").select(problem([core, plain], 0.3, PARAM_RATIO))
    assert ranks == {"core": 6, "plain": 7}
    assert all(type(v) is int for v in ranks.values())


def test_uniform_rank_cap_and_rank_total():
    sites = [Site(name=f"s{i}", shape=shape) for i, shape in enumerate([(64, 32), (16, 100), (8, 8), (64, 64)])]
    sel = make("uniform")
    assert sel.select(problem(sites, 20, RANK_CAP)) == {"s0": 20, "s1": 16, "s2": 8, "s3": 20}
    assert sel.select(problem(sites, 0, RANK_CAP)) == {"s0": 1, "s1": 1, "s2": 1, "s3": 1}
    # 42 = 4 * 10 + 2: the first two sites get one more; s2 is capped at its max rank 8 and its surplus (2) goes
    # to the first two open sites again, so the whole budget is used
    assert sel.select(problem(sites, 42, RANK_TOTAL)) == {"s0": 12, "s1": 12, "s2": 8, "s3": 10}
    assert sel.select(problem(sites, 40, RANK_TOTAL)) == {"s0": 11, "s1": 11, "s2": 8, "s3": 10}
    # more than all sites can take: everyone at max rank
    assert sel.select(problem(sites, 1000, RANK_TOTAL)) == {"s0": 32, "s1": 16, "s2": 8, "s3": 64}
    assert sel.select(problem(sites, 2, RANK_TOTAL)) == {"s0": 1, "s1": 1, "s2": 1, "s3": 1}
    assert sel.select(problem(sites, 7.9, RANK_TOTAL)) == {"s0": 2, "s1": 2, "s2": 2, "s3": 1}
    with pytest.raises(ValueError):
        sel.select(problem(sites, None, None))


def test_uniform_tensor_site():
    shape = (5, 8, 20)
    cp = Site(name="T", shape=shape, params_at_rank=lambda k: k * sum(shape))  # max_rank = 5
    sel = make("uniform")
    assert sel.select(problem([cp], 6, RANK_CAP)) == {"T": (5, 6, 6)}
    assert sel.select(problem([cp], 3, RANK_CAP)) == {"T": (3, 3, 3)}
    assert sel.select(problem([cp], 0.1, PARAM_RATIO)) == {"T": (2, 2, 2)}  # floor(80 / 33)
    # floor(0.9 * 800 / 33) = 21, clipped per mode (max_rank = min(shape) does not bound the modes)
    assert sel.select(problem([cp], 0.9, PARAM_RATIO)) == {"T": (5, 8, 20)}
    assert sel.select(problem([cp], 0.5, PARAM_RATIO)) == {"T": (5, 8, 12)}
    assert sel.select(problem([cp, Site(name="W", shape=(10, 10))], 9, RANK_TOTAL)) == {"T": (5, 5, 5), "W": 4}


# --------------------------------------------------------------------------------------------------------------
# energy

KNOWN_ENERGY = np.sqrt([50.0, 25.0, 12.5, 6.25, 6.25])  # cumulative fractions 0.5, 0.75, 0.875, 0.9375, 1


@pytest.mark.parametrize(
    ("eta", "k"), [(0.3, 1), (0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.875, 3), (0.9, 4), (0.95, 5), (1.0, 5)]
)
def test_energy_known_fractions(eta, k):
    site = spectrum_site(KNOWN_ENERGY, (5, 7))
    assert make("energy", eta=eta).select(problem([site])) == {"W": k}
    # budget-free under every other budget kind: the budget is ignored
    assert make("energy", eta=eta).select(problem([site], 1, RANK_CAP)) == {"W": k}


def test_energy_default_eta_and_validation():
    assert make("energy").params.eta == 0.95
    assert make("energy").select(problem([spectrum_site(KNOWN_ENERGY, (5, 7))])) == {"W": 5}
    with pytest.raises(ValidationError):
        make("energy", eta=1.5)


def _decaying_sites(seed: int) -> list[Site]:
    rng = np.random.default_rng(seed)
    sites = []
    for i, (m, n) in enumerate([(64, 48), (32, 96), (80, 80), (40, 20)]):
        p = min(m, n)
        s = np.sort(np.exp(-rng.uniform(0.02, 0.3) * np.arange(p)) * rng.uniform(0.5, 1.0, p))[::-1]
        sites.append(spectrum_site(s, (m, n), name=f"s{i}"))
    return sites


def _rank_profile(fracs, eta):
    return [min(int(np.searchsorted(c, eta, side="left")) + 1, len(c)) for c in fracs]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rho", [0.05, 0.15, 0.3, 0.6])
def test_energy_bisection_meets_the_budget(seed, rho):
    sites = _decaying_sites(seed)
    ranks = make("energy").select(problem(sites, rho, PARAM_RATIO))
    ks = [ranks[s.name] for s in sites]
    assert all(type(k) is int for k in ks)
    cost = lambda profile: sum(s.params_at_rank(k) for s, k in zip(sites, profile))  # noqa: E731
    limit = rho * sum(s.dense_params for s in sites)
    assert cost(ks) <= limit

    fracs = [energy_fractions(s.singular_values) for s in sites]
    # the profile is produced by one common threshold: eta in (c_{k-1}, c_k] for every site
    low = max(c[k - 2] if k > 1 else 0.0 for c, k in zip(fracs, ks))
    high = min(c[k - 1] for c, k in zip(fracs, ks))
    assert low < high
    # exhaustive search over all thresholds where some rank changes: no feasible profile is larger
    costs = [cost(_rank_profile(fracs, eta)) for eta in np.unique(np.concatenate(fracs))]
    best = max(c for c in costs if c <= limit)
    assert cost(ks) == best
    # one more rank on any site either breaks the budget or is not a common-threshold profile
    for i in range(len(sites)):
        if ks[i] == sites[i].max_rank:
            continue
        more = list(ks)
        more[i] += 1
        low = max(c[k - 2] if k > 1 else 0.0 for c, k in zip(fracs, more))
        high = min(c[k - 1] for c, k in zip(fracs, more))
        assert cost(more) > limit or not low < high


def test_energy_budget_extremes():
    sites = _decaying_sites(0)
    # too small for rank 1 everywhere: rank 1 everywhere
    assert set(make("energy").select(problem(sites, 1e-4, PARAM_RATIO)).values()) == {1}
    # everything fits: eta = 1, the full numerical rank
    roomy = [Site(name="a", shape=(4, 100), singular_values=np.array([3.0, 2.0, 1.0, 0.5]), params_at_rank=lambda k: k)]
    assert make("energy").select(problem(roomy, 1.0, PARAM_RATIO)) == {"a": 4}


def test_energy_tensor_site_under_param_ratio():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((10, 12, 14)) * np.exp(-0.3 * np.arange(14))
    site = tensor_site(t, params_at_rank=lambda k: k * 36)
    ranks = make("energy").select(problem([site, *_decaying_sites(1)], 0.2, PARAM_RATIO))
    assert isinstance(ranks["T"], tuple) and len(ranks["T"]) == 3
    total = site.params_at_rank(max(ranks["T"])) + sum(
        s.params_at_rank(ranks[s.name]) for s in _decaying_sites(1)
    )
    assert total <= 0.2 * (site.dense_params + sum(s.dense_params for s in _decaying_sites(1)))


# --------------------------------------------------------------------------------------------------------------
# effective-rank


@pytest.mark.parametrize(("r", "p"), [(1, 4), (3, 10), (7, 7), (12, 40)])
def test_effective_rank_of_equal_singular_values(r, p):
    s = np.r_[np.full(r, 2.5), np.zeros(p - r)]
    assert effective_rank.effective_rank(s) == pytest.approx(r, rel=1e-12)
    assert make("effective-rank").select(problem([spectrum_site(s, (p, p + 3))])) == {"W": r}


def test_effective_rank_hand_computed():
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, erank = 2^1.5 = 2.828 -> 3
    assert effective_rank.effective_rank([2.0, 1.0, 1.0]) == pytest.approx(2 ** 1.5)
    assert make("effective-rank").select(problem([spectrum_site([2.0, 1.0, 1.0], (3, 5))])) == {"W": 3}
    # p = (3/4, 1/4): erank = exp(-(0.75 log 0.75 + 0.25 log 0.25)) = 1.7548 -> 2
    assert effective_rank.effective_rank([3.0, 1.0]) == pytest.approx(1.7547654, abs=1e-6)
    # p = (0.9, 0.1): erank = 1.3837 -> 1
    assert make("effective-rank").select(problem([spectrum_site([9.0, 1.0], (2, 2))])) == {"W": 1}
    assert effective_rank.effective_rank([0.0, 0.0]) == 1.0


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999, 3.5, 3.50001, 4.0)] == [1, 2, 3, 2, 4, 4, 4]


# --------------------------------------------------------------------------------------------------------------
# All selectors: ranks are Python ints in range, per mode for tensors, deterministic


def _all_selectors_with_budgets():
    return [
        (make("uniform"), 0.3, PARAM_RATIO),
        (make("uniform"), 5, RANK_CAP),
        (make("uniform"), 17, RANK_TOTAL),
        (make("energy"), None, None),
        (make("energy"), 0.3, PARAM_RATIO),
        (make("energy", eta=0.5), 4, RANK_CAP),
        (make("effective-rank"), None, None),
        (make("oht"), None, None),
        (make("evbmf"), None, None),
        (make("evbmf", sigma2=0.01), None, None),
    ]


def _awkward_sites():
    rng = np.random.default_rng(5)
    t = rng.standard_normal((4, 6, 9))
    return [
        matrix_site(planted(40, 25, 3, 0.5, 0)),
        matrix_site(rng.standard_normal((1, 30)), name="row"),  # a single singular value
        matrix_site(rng.standard_normal((2, 2)), name="tiny"),
        spectrum_site([5.0, 3.0, 0.0, 0.0, 0.0], (5, 8), name="deficient"),  # exact zeros
        spectrum_site(np.zeros(6), (6, 6), name="zero"),
        spectrum_site(np.ones(10), (10, 10), name="flat"),
        tensor_site(t, params_at_rank=lambda k: k * 19),
        tensor_site(rng.standard_normal((3, 2, 2, 5)), name="T4", params_at_rank=lambda k: k * 12),
    ]


def test_all_selectors_return_ints_in_range():
    sites = _awkward_sites()
    for sel, budget, kind in _all_selectors_with_budgets():
        ranks = sel.select(problem(sites, budget, kind))
        assert set(ranks) == {s.name for s in sites}, sel
        for site in sites:
            k = ranks[site.name]
            if site.mode_singular_values is not None:
                assert isinstance(k, tuple) and len(k) == len(site.shape), (sel, site.name, k)
                assert all(type(x) is int and 1 <= x <= d for x, d in zip(k, site.shape)), (sel, site.name, k)
            else:
                assert type(k) is int and 1 <= k <= site.max_rank, (sel, site.name, k)
        assert sel.select(problem(sites, budget, kind)) == ranks  # deterministic


def test_unfolding_dims():
    assert unfolding_dims((4, 6, 9), 0) == (4, 54)
    assert unfolding_dims((4, 6, 9), 2) == (9, 24)


def test_selectors_on_a_recovery_site():
    from rankbench.kinds.recovery import RecoveryProblem

    x = planted(60, 50, 3, 0.01, 4)
    site = RecoveryProblem(problem="robust", shape=x.shape, target=x, observed=x).site()
    for name in ("oht", "evbmf"):
        assert make(name).select(problem([site])) == {"X": 3}
    for name in ("effective-rank", "energy"):
        k = make(name).select(problem([site]))["X"]
        assert type(k) is int and 1 <= k <= 50


# --------------------------------------------------------------------------------------------------------------
# tensor sites with their own rank slots and exact tuple costs (e.g. a tensor train)


def tt_site(decay: float = 0.5) -> Site:
    """A TT-like site of a 4-way (4, 6, 6, 4) tensor: three internal ranks, the sequential unfoldings 4 x 144,
    24 x 24, 144 x 4, cores costing r0 n1 r1 + r1 n2 r2 + ... (r0 = r4 = 1)."""
    dims = (4, 6, 6, 4)

    def cost(ranks):
        r = (1, *ranks, 1)
        return sum(r[k] * dims[k] * r[k + 1] for k in range(4))

    spectra = [decay ** np.arange(n) for n in (4, 24, 4)]
    return Site(name="tt", shape=dims, mode_singular_values=spectra, rank_dims=[(4, 144), (24, 24), (144, 4)],
                rank_caps=[4, 24, 4], params_at_ranks=cost, params_at_rank=lambda k: cost((k, k, k)))


def test_tensor_slots_follow_rank_dims_and_caps():
    site = tt_site()
    assert make("uniform").select(problem([site], 30, RANK_CAP)) == {"tt": (4, 24, 4)}
    assert make("uniform").select(problem([site], 3, RANK_CAP)) == {"tt": (3, 3, 3)}
    # energy per slot reads each slot's own spectrum (eta 0.99 of a 0.5-geometric spectrum keeps 4 values)
    assert make("energy", eta=0.99).select(problem([site], None, None)) == {"tt": (4, 4, 4)}


@pytest.mark.parametrize("name", ["uniform", "energy"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_param_ratio_on_tensor_slots_is_priced_exactly(name, ratio):
    site = tt_site(decay=0.8)
    ranks = make(name).select(problem([site], ratio, PARAM_RATIO))["tt"]
    assert site.params_at_ranks(ranks) <= ratio * site.dense_params
    if name == "uniform":  # the largest common rank that fits, priced as a tuple
        k = max(ranks)
        bigger = tuple(min(k + 1, c) for c in site.rank_caps)
        assert bigger == ranks or site.params_at_ranks(bigger) > ratio * site.dense_params
