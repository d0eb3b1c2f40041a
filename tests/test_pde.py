"""PDE problems of the PINN task: reference solutions against their equations, boundary data, an independent Burgers
solver and the classical Burgers shock gradient, sampling, residuals of a network, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankbench_plugins.tasks._pde import (
    FAMILIES,
    Burgers,
    Convection,
    Helmholtz,
    PDEProblem,
    Poisson,
    burgers_cole_hopf,
    make_problem,
    relative_errors,
)

DEFAULT_NU = 0.01 / math.pi


pytestmark = pytest.mark.usefixtures("single_torch_thread")

CASES = [
    ("burgers", DEFAULT_NU),
    ("burgers", 0.1),
    ("convection", 1.0),
    ("convection", 30.0),
    ("helmholtz", 4.0),
    ("helmholtz", 2.5),
    ("poisson", 1.0),
    ("poisson", 2.5),
]


def _ids(cases):
    return [f"{family}-{param:.4g}" for family, param in cases]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def interior_after(problem: PDEProblem, n: int, t_min: float) -> torch.Tensor:
    """Interior points with t >= t_min (the Cole-Hopf reference has an infinite t-derivative at t = 0 in sqrt(t))."""
    points = problem.interior_points(n, generator(1))
    if "t" in problem.coords:
        axis = problem.coords.index("t")
        points[:, axis] = t_min + (problem.upper[axis] - t_min) * points[:, axis] / problem.upper[axis]
    return points


# ---------------------------------------------------------------------------------------------------------------
# Reference solutions satisfy their PDEs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "param"), CASES, ids=_ids(CASES))
def test_reference_satisfies_its_pde_under_autograd(family, param):
    """All references are torch expressions, so ``residual`` can differentiate them like a network."""
    problem = make_problem(family, param)
    points = interior_after(problem, 1000, t_min=0.05)
    residual = problem.residual(problem.reference, points)
    assert residual.shape == (1000,)
    assert residual.dtype == torch.float64
    # scale of the individual terms: |u_t| ~ |beta|, |Laplacian u| ~ (1 + a2^2) pi^2, Burgers terms ~ 100
    scale = {"burgers": 1e3, "convection": 1 + param, "helmholtz": (1 + param**2) * math.pi**2,
             "poisson": (1 + param**2) * math.pi**2}[family]
    assert residual.abs().max().item() < 1e-11 * scale


@pytest.mark.parametrize("nu", [DEFAULT_NU, 0.1])
def test_burgers_reference_residual_by_finite_differences(nu):
    """The Cole-Hopf solution checked without autograd: central differences on a grid with t in [0.1, 1], including
    the steep front at x = 0."""
    h = 1e-4
    x = torch.linspace(-0.95, 0.95, 39, dtype=torch.float64)
    x = torch.cat([x, torch.linspace(-0.02, 0.02, 21, dtype=torch.float64)])
    t = torch.linspace(0.1, 1.0, 19, dtype=torch.float64)
    xx, tt = (grid.reshape(-1) for grid in torch.meshgrid(x, t, indexing="ij"))

    def u(dx, dt):
        return burgers_cole_hopf(xx + dx, tt + dt, nu)

    u0 = u(0, 0)
    u_t = (u(0, h) - u(0, -h)) / (2 * h)
    u_x = (u(h, 0) - u(-h, 0)) / (2 * h)
    u_xx = (u(h, 0) - 2 * u0 + u(-h, 0)) / h**2
    residual = u_t + u0 * u_x - nu * u_xx
    scale = max(u_t.abs().max(), (u0 * u_x).abs().max(), (nu * u_xx).abs().max()).item()
    assert scale > 1.0
    assert residual.abs().max().item() < 3e-4 * scale  # measured 8e-5 for nu = 0.01/pi (truncation at the front)


# ---------------------------------------------------------------------------------------------------------------
# Burgers: initial / boundary conditions and independent checks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nu", [0.001 / math.pi, DEFAULT_NU, 0.1, 1.0])
def test_burgers_initial_and_boundary_conditions(nu):
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    at_start = burgers_cole_hopf(x, torch.zeros_like(x), nu)
    assert torch.equal(at_start, -torch.sin(math.pi * x))
    t = torch.linspace(1e-6, 1, 50, dtype=torch.float64)
    for wall in (-1.0, 1.0):
        assert burgers_cole_hopf(torch.full_like(t, wall), t, nu).abs().max().item() < 1e-12


def test_burgers_peak_gradient_matches_basdevant():
    """Basdevant et al. (1986): for nu = 0.01/pi, |du/dx| at x = 0 peaks at t = 1.6037/pi with value 152.00516."""
    h = 1e-5
    t_peak = 1.6037 / math.pi

    def slope_at_origin(t):
        ts = torch.tensor([t, t], dtype=torch.float64)
        u = burgers_cole_hopf(torch.tensor([h, -h], dtype=torch.float64), ts, DEFAULT_NU)
        return ((u[0] - u[1]) / (2 * h)).item()

    peak = slope_at_origin(t_peak)
    assert peak == pytest.approx(-152.00516, rel=1e-4)
    assert abs(slope_at_origin(t_peak - 0.01)) < abs(peak)
    assert abs(slope_at_origin(t_peak + 0.01)) < abs(peak)
    assert abs(slope_at_origin(1 / math.pi)) < 50  # the front is still forming at t = 1/pi (about 34.2)


def test_burgers_matches_an_explicit_finite_difference_solution():
    """An independent solver: method of lines on a uniform grid, central differences, classical RK4 in time."""
    nu, t_end = 0.1, 0.5
    x = np.linspace(-1, 1, 201)
    h = x[1] - x[0]
    steps = 1250
    dt = t_end / steps  # nu dt / h^2 = 0.4: inside RK4's stability region

    def rhs(u):
        du = np.zeros_like(u)
        inner = u[1:-1]
        u_x = (u[2:] - u[:-2]) / (2 * h)
        u_xx = (u[2:] - 2 * inner + u[:-2]) / h**2
        du[1:-1] = -inner * u_x + nu * u_xx  # the walls stay at zero
        return du

    u = -np.sin(np.pi * x)
    u[[0, -1]] = 0.0
    for _ in range(steps):
        k1 = rhs(u)
        k2 = rhs(u + dt / 2 * k1)
        k3 = rhs(u + dt / 2 * k2)
        k4 = rhs(u + dt * k3)
        u = u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    exact = burgers_cole_hopf(torch.from_numpy(x), torch.full((x.size,), t_end, dtype=torch.float64), nu).numpy()
    assert np.abs(exact).max() > 0.3
    assert np.abs(u - exact).max() < 1e-3


@pytest.mark.parametrize("nu", [DEFAULT_NU, 0.001 / math.pi])
def test_burgers_quadrature_matches_dense_trapezoid(nu):
    """The Gauss-Hermite rule against a dense trapezoidal rule of the same Cole-Hopf integrals."""
    x = np.linspace(-1, 1, 41)
    t = 1.0
    z = np.linspace(-60, 60, 120001)
    y = x[:, None] - math.sqrt(4 * nu * t) * z[None, :]
    log_terms = -z**2 - np.cos(np.pi * y) / (2 * np.pi * nu)
    terms = np.exp(log_terms - log_terms.max(axis=1, keepdims=True))
    dense = -(np.sin(np.pi * y) * terms).sum(axis=1) / terms.sum(axis=1)
    ours = burgers_cole_hopf(torch.from_numpy(x), torch.full((x.size,), t, dtype=torch.float64), nu).numpy()
    assert np.abs(ours - dense).max() < 1e-10


def test_burgers_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="nu"):
        make_problem("burgers", 0.0)
    with pytest.raises(ValueError, match="validated"):
        make_problem("burgers", 1e-4).reference(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="t >= 0"):
        make_problem("burgers").reference(torch.tensor([[0.0, -0.1]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Boundary data, periodicity, sampling
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "param"), CASES, ids=_ids(CASES))
def test_boundary_points_lie_on_the_dirichlet_faces_and_carry_the_reference(family, param):
    problem = make_problem(family, param)
    points = problem.boundary_points(500, generator())
    assert points.shape == (500, problem.dim) and points.dtype == torch.float64
    on_some_face = torch.zeros(500, dtype=torch.bool)
    for axis, side in problem.dirichlet_faces:
        bound = (problem.upper if side else problem.lower)[axis]
        on_some_face |= points[:, axis] == bound
    assert bool(on_some_face.all())
    torch.testing.assert_close(problem.boundary_values(points), problem.reference(points), rtol=0, atol=1e-12)


def test_burgers_boundary_data():
    problem = make_problem("burgers")
    points = problem.boundary_points(4000, generator())
    on_start = points[:, 1] == 0
    assert 0.45 < on_start.double().mean().item() < 0.55  # t = 0 has length 2, the walls 1 each
    values = problem.boundary_values(points)
    assert torch.equal(values[on_start], -torch.sin(math.pi * points[on_start, 0]))
    assert torch.equal(values[~on_start], torch.zeros(int((~on_start).sum()), dtype=torch.float64))


@pytest.mark.parametrize(("family", "param"), [("helmholtz", 4.0), ("helmholtz", 1.0), ("poisson", 1.0),
                                               ("poisson", 3.0)])
def test_integer_parameters_give_homogeneous_dirichlet_data(family, param):
    problem = make_problem(family, param)
    points = problem.boundary_points(400, generator())
    assert problem.reference(points).abs().max().item() < 1e-12


def test_non_integer_parameters_give_the_exact_trace_as_dirichlet_data():
    problem = make_problem("poisson", 2.5)
    top = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    assert problem.boundary_values(top).item() == pytest.approx(math.sin(2.5 * math.pi))


def test_convection_initial_condition_and_periodic_pairs():
    problem = make_problem("convection", 30.0)
    start = problem.boundary_points(200, generator())
    assert bool((start[:, 1] == 0).all())
    torch.testing.assert_close(problem.boundary_values(start), torch.sin(start[:, 0]), rtol=0, atol=1e-15)
    left, right = problem.periodic_pairs(300, generator())
    assert left.shape == right.shape == (300, 2)
    assert bool((left[:, 0] == 0).all()) and bool((right[:, 0] == 2 * math.pi).all())
    assert torch.equal(left[:, 1], right[:, 1])
    assert 0 <= left[:, 1].min().item() and left[:, 1].max().item() <= 1
    torch.testing.assert_close(problem.reference(left), problem.reference(right), rtol=0, atol=1e-12)
    for family in ("burgers", "helmholtz", "poisson"):
        assert make_problem(family).periodic_pairs(10, generator()) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_interior_points_and_test_grid(family):
    problem = make_problem(family)
    points = problem.interior_points(1000, generator(3))
    assert points.shape == (1000, problem.dim) and points.dtype == torch.float64
    lower = torch.tensor(problem.lower, dtype=torch.float64)
    upper = torch.tensor(problem.upper, dtype=torch.float64)
    assert bool(((points >= lower) & (points <= upper)).all())
    assert torch.equal(points, problem.interior_points(1000, generator(3)))
    grid = problem.test_grid(5)
    assert grid.shape == (25, 2)
    assert torch.equal(grid[0], lower) and torch.equal(grid[-1], upper)
    assert grid[1, 0] == grid[0, 0] and grid[1, 1] > grid[0, 1]  # the first coordinate varies slowest
    assert problem.reference(grid).shape == (25,)


# ---------------------------------------------------------------------------------------------------------------
# Residual of a network
# ---------------------------------------------------------------------------------------------------------------


def small_mlp(d: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_of_a_network_is_finite_and_trainable(family):
    problem = make_problem(family)
    model = small_mlp(problem.dim)
    points = problem.interior_points(64, generator())
    residual = problem.residual(model, points)
    assert residual.shape == (64,)
    assert bool(torch.isfinite(residual).all())
    assert not points.requires_grad  # the caller's tensor is left alone
    (residual**2).mean().backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            # only the output bias may be unused: the convection and Poisson residuals see derivatives of u only
            assert name == "4.bias" and family in ("convection", "poisson")
        else:
            assert bool(torch.isfinite(parameter.grad).all())
    assert model[0].weight.grad.abs().sum().item() > 0
    assert model[4].weight.grad.abs().sum().item() > 0
    # a model returning shape (N,) gives the same residual
    flat = problem.residual(lambda p: model(p).squeeze(-1), points)
    torch.testing.assert_close(flat, residual)


def test_residual_of_a_known_function():
    """u = x^2 + y^2 has Laplacian 4: the Poisson residual is -4 - f; u = x - beta t solves the convection PDE."""
    poisson = make_problem("poisson", 1.0)
    points = poisson.interior_points(50, generator())
    residual = poisson.residual(lambda p: (p**2).sum(dim=1, keepdim=True), points)
    torch.testing.assert_close(residual, -4 - poisson.source(points))
    convection = make_problem("convection", 7.0)
    points = convection.interior_points(50, generator())
    residual = convection.residual(lambda p: p[:, 0] - 7.0 * p[:, 1], points)
    assert residual.abs().max().item() < 1e-14
    # a constant model: all derivatives vanish
    burgers = make_problem("burgers")
    residual = burgers.residual(lambda p: torch.ones(p.shape[0], dtype=p.dtype), burgers.interior_points(5, generator()))
    assert torch.equal(residual, torch.zeros(5, dtype=torch.float64))


def test_residual_rejects_a_wrong_output_size():
    problem = make_problem("helmholtz")
    with pytest.raises(ValueError, match="one value per point"):
        problem.residual(lambda p: torch.zeros(p.shape[0], 2, dtype=p.dtype), problem.interior_points(4, generator()))


# ---------------------------------------------------------------------------------------------------------------
# Registry and metrics
# ---------------------------------------------------------------------------------------------------------------


def test_registry_and_defaults():
    assert FAMILIES == {"burgers": Burgers, "convection": Convection, "helmholtz": Helmholtz, "poisson": Poisson}
    assert {name: (cls.param_name, cls.default_param) for name, cls in FAMILIES.items()} == {
        "burgers": ("nu", 0.01 / math.pi), "convection": ("beta", 30.0), "helmholtz": ("a2", 4.0),
        "poisson": ("freq", 1.0),
    }
    problem = make_problem("helmholtz")
    assert isinstance(problem, Helmholtz) and problem.param == 4.0 and problem.family == "helmholtz"
    assert problem.coords == ("x", "y") and problem.lower == (-1.0, -1.0) and problem.upper == (1.0, 1.0)
    assert make_problem("convection", 5).param == 5.0 and isinstance(make_problem("convection", 5).param, float)
    assert make_problem("poisson", 2.0) == Poisson(2.0)
    with pytest.raises(ValueError, match="burgers, convection, helmholtz, poisson"):
        make_problem("navier-stokes")
    with pytest.raises(ValueError, match="finite"):
        make_problem("convection", float("nan"))


def test_relative_errors_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = torch.tensor([1.0, 2.0, 2.0, 2.0])  # error (0, 0, 1, 2)
    errors = relative_errors(pred, ref)
    assert errors == pytest.approx({"l2re": math.sqrt(5 / 13), "l1re": 3 / 7, "maxe": 2.0, "mse": 5 / 4}, rel=1e-15)
    assert relative_errors(pred.reshape(4, 1), ref.numpy()) == pytest.approx(errors, rel=1e-15)
    assert relative_errors(ref, ref) == {"l2re": 0.0, "l1re": 0.0, "maxe": 0.0, "mse": 0.0}
    with pytest.raises(ValueError, match="size"):
        relative_errors(pred, ref[:3])
