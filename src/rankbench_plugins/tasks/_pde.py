"""PDE problems for a physics-informed neural network (PINN) task: equations, sampling, reference solutions, metrics.

Every family is one PDE with one scalar *transfer parameter*: a problem is a family at one parameter value, and a
user trains (or fine-tunes) a PINN across values of that parameter. Everything is float64 torch.

Families (coordinates are the inputs of the network, in this order)
    ``burgers``     parameter ``nu`` (viscosity), default 0.01/pi, coordinates (x, t) in [-1, 1] x [0, 1]:
                        u_t + u u_x = nu u_xx,   u(x, 0) = -sin(pi x),   u(-1, t) = u(1, t) = 0.
                    The setup of PINNacle's Burgers1d (Hao et al., "PINNacle: A comprehensive benchmark of
                    physics-informed neural networks for solving PDEs", NeurIPS 2024; github.com/i207M/PINNacle).
                    Reference: the Cole-Hopf transform u = -2 nu phi_x / phi with phi solving the heat equation,
                    which gives (Basdevant et al., "Spectral and finite difference solutions of the Burgers
                    equation", Computers & Fluids 14, 1986)
                        u(x, t) = - int sin(pi (x - eta)) f(x - eta) G(eta) d eta / int f(x - eta) G(eta) d eta,
                        f(y) = exp(-cos(pi y) / (2 pi nu)),   G(eta) = exp(-eta^2 / (4 nu t)).
                    With eta = sqrt(4 nu t) z both integrals are Gauss-Hermite integrals in z; they are evaluated
                    with ``BURGERS_HERMITE_NODES`` nodes, in log space with the largest term factored out (f alone
                    overflows for small nu). Against a dense trapezoidal rule the error is ~1e-15 for
                    nu >= 0.001/pi; smaller viscosities are refused. At t = 0 the initial condition is returned
                    exactly.
    ``convection``  parameter ``beta`` (wave speed), default 30, coordinates (x, t) in [0, 2 pi] x [0, 1]:
                        u_t + beta u_x = 0,   u(x, 0) = sin x,   u(0, t) = u(2 pi, t) (periodic).
                    Exact solution u = sin(x - beta t). The failure-mode study of Krishnapriyan et al.,
                    "Characterizing possible failure modes in physics-informed neural networks", NeurIPS 2021
                    (plain PINNs fail from beta ~ 30 on; the default sits there).
    ``helmholtz``   parameter ``a2`` (wave number in y), default 4, coordinates (x, y) in [-1, 1]^2:
                        u_xx + u_yy + k^2 u = q,   q = (k^2 - (a1 pi)^2 - (a2 pi)^2) sin(a1 pi x) sin(a2 pi y),
                    with a1 = 1 and k = 1 fixed, and exact solution u = sin(a1 pi x) sin(a2 pi y). The problem of
                    Wang, Teng & Perdikaris, "Understanding and mitigating gradient flow pathologies in
                    physics-informed neural networks", SIAM J. Sci. Comput. 2021 (a1 = 1, a2 = 4, k = 1).
    ``poisson``     parameter ``freq``, default 1, coordinates (x, y) in [0, 1]^2:
                        -(u_xx + u_yy) = f,   f = (1 + freq^2) pi^2 sin(pi x) sin(freq pi y),
                    a manufactured problem with exact solution u = sin(pi x) sin(freq pi y).

Boundary data. The Dirichlet data of ``helmholtz`` and ``poisson`` is the trace of the exact solution: zero on the
whole boundary when the parameter is an integer, and the (non-zero) exact values on the edges y = +-1 (helmholtz) or
y = 1 (poisson) otherwise, so that every parameter value is a well-posed problem with a known solution. ``burgers``
prescribes its initial condition on t = 0 and zero on x = +-1; ``convection`` prescribes its initial condition on
t = 0 and is periodic in x (``periodic_pairs``).

Residuals are written as "left-hand side minus right-hand side" of the equations above and are computed with
``torch.autograd.grad(..., create_graph=True)``, so a loss built from them can be trained on.

Metrics (``relative_errors``), as reported by PINNacle: l2re = ||u - u_ref||_2 / ||u_ref||_2,
l1re = mean|u - u_ref| / mean|u_ref|, maxe = max|u - u_ref|, mse = mean (u - u_ref)^2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import Tensor

    Model = Callable[[Tensor], Tensor]

BURGERS_HERMITE_NODES = 300
BURGERS_MIN_NU = 0.001 / math.pi  # the Gauss-Hermite rule above is validated down to this viscosity
_BURGERS_CHUNK = 4096  # points per quadrature block (the block holds points x nodes values)


def dtype() -> torch.dtype:
    """The dtype of every tensor here, ``torch.float64`` (a function: importing this module does not import torch)."""
    import torch

    return torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Automatic differentiation helpers
# ---------------------------------------------------------------------------------------------------------------


def _gradient(values: Tensor, points: Tensor) -> Tensor:
    """d(values_i)/d(points_i) for every row i, shape (N, d); kept in the graph so that it can be differentiated
    again (and trained on). A model output that does not depend on the points has zero gradient."""
    import torch

    if not values.requires_grad:
        return torch.zeros_like(points)
    (grad,) = torch.autograd.grad(
        values, points, grad_outputs=torch.ones_like(values), create_graph=True, allow_unused=True
    )
    return torch.zeros_like(points) if grad is None else grad


def _evaluate(model: Model, points: Tensor) -> tuple[Tensor, Tensor]:
    """Return (x, u): a fresh leaf copy of the points that requires grad, and the model output there, shape (N,)."""
    x = points.detach().clone().requires_grad_(True)
    u = model(x)
    if u.numel() != x.shape[0]:
        raise ValueError(f"the model must return one value per point: got shape {tuple(u.shape)} "
                         f"for {x.shape[0]} points")
    return x, u.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PDEProblem:
    """One PDE family at one value of its transfer parameter.

    Subclasses set the class-level description of the family (name, parameter, coordinates and box) and implement
    ``residual`` and ``reference``. All sampled points are float64 tensors of shape (N, d), one column per entry of
    ``coords``, on the generator's device.
    """

    param: float

    family: ClassVar[str]
    param_name: ClassVar[str]
    default_param: ClassVar[float]
    coords: ClassVar[tuple[str, ...]]
    lower: ClassVar[tuple[float, ...]]
    upper: ClassVar[tuple[float, ...]]
    # Faces of the box that carry Dirichlet (or initial) data, as (axis, side) with side 0 = lower, 1 = upper.
    dirichlet_faces: ClassVar[tuple[tuple[int, int], ...]]

    def __post_init__(self) -> None:
        value = float(self.param)
        if not math.isfinite(value):
            raise ValueError(f"{self.family}: {self.param_name} must be finite, got {self.param!r}")
        object.__setattr__(self, "param", value)

    @property
    def dim(self) -> int:
        return len(self.coords)

    # --- to be provided by each family ---------------------------------------------------------------------------

    def residual(self, model: Model, points: Tensor) -> Tensor:
        """The PDE residual of u = model(points) at the points, shape (N,)."""
        raise NotImplementedError

    def reference(self, points: Tensor) -> Tensor:
        """The reference (exact) solution at the points, shape (N,)."""
        raise NotImplementedError

    # --- shared by all families ----------------------------------------------------------------------------------

    def boundary_values(self, points: Tensor) -> Tensor:
        """The prescribed Dirichlet / initial values at points on ``dirichlet_faces``, shape (N,)."""
        return self.reference(points)

    def periodic_pairs(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor] | None:
        """Matched points on the two faces of a periodic direction (None when the family has none)."""
        return None

    def interior_points(self, n: int, generator: torch.Generator) -> Tensor:
        """n collocation points drawn uniformly in the box, shape (n, d)."""
        import torch

        lower, upper = self._bounds(generator.device)
        return lower + (upper - lower) * torch.rand(n, self.dim, generator=generator, dtype=dtype(),
                                                    device=generator.device)

    def boundary_points(self, n: int, generator: torch.Generator) -> Tensor:
        """n points drawn uniformly (by length / area) on the union of the Dirichlet / initial faces, shape (n, d)."""
        import torch

        device = generator.device
        lower, upper = self._bounds(device)
        points = self.interior_points(n, generator)
        widths = upper - lower
        face_sizes = torch.stack([torch.prod(torch.cat([widths[:axis], widths[axis + 1:]]))
                                  for axis, _ in self.dirichlet_faces])
        face = torch.multinomial(face_sizes, n, replacement=True, generator=generator)
        for index, (axis, side) in enumerate(self.dirichlet_faces):
            on_face = face == index
            points[on_face, axis] = (upper if side else lower)[axis]
        return points

    def test_grid(self, n_per_axis: int) -> Tensor:
        """The regular grid with n_per_axis points per coordinate (bounds included), shape (n_per_axis**d, d); the
        first coordinate varies slowest."""
        import torch

        axes = [torch.linspace(lo, hi, n_per_axis, dtype=dtype()) for lo, hi in zip(self.lower, self.upper)]
        return torch.stack([grid.reshape(-1) for grid in torch.meshgrid(*axes, indexing="ij")], dim=1)

    def _bounds(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        import torch

        return (torch.tensor(self.lower, dtype=dtype(), device=device),
                torch.tensor(self.upper, dtype=dtype(), device=device))


@dataclass(frozen=True)
class Burgers(PDEProblem):
    """u_t + u u_x = nu u_xx on [-1, 1] x [0, 1], u(x, 0) = -sin(pi x), u(+-1, t) = 0."""

    family: ClassVar[str] = "burgers"
    param_name: ClassVar[str] = "nu"
    default_param: ClassVar[float] = 0.01 / math.pi
    coords: ClassVar[tuple[str, ...]] = ("x", "t")
    lower: ClassVar[tuple[float, ...]] = (-1.0, 0.0)
    upper: ClassVar[tuple[float, ...]] = (1.0, 1.0)
    dirichlet_faces: ClassVar[tuple[tuple[int, int], ...]] = ((1, 0), (0, 0), (0, 1))  # t = 0, x = -1, x = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.param <= 0:
            raise ValueError(f"burgers: nu must be positive, got {self.param}")

    def residual(self, model: Model, points: Tensor) -> Tensor:
        nu = self.param
        x, u = _evaluate(model, points)
        du = _gradient(u, x)
        u_x, u_t = du[:, 0], du[:, 1]
        u_xx = _gradient(u_x, x)[:, 0]
        return u_t + u * u_x - nu * u_xx

    def boundary_values(self, points: Tensor) -> Tensor:
        import torch

        x, t = points[:, 0], points[:, 1]
        return torch.where(t == self.lower[1], -torch.sin(math.pi * x), torch.zeros_like(x))

    def reference(self, points: Tensor) -> Tensor:
        return burgers_cole_hopf(points[:, 0], points[:, 1], self.param)


@dataclass(frozen=True)
class Convection(PDEProblem):
    """u_t + beta u_x = 0 on [0, 2 pi] x [0, 1], u(x, 0) = sin x, periodic in x; u = sin(x - beta t)."""

    family: ClassVar[str] = "convection"
    param_name: ClassVar[str] = "beta"
    default_param: ClassVar[float] = 30.0
    coords: ClassVar[tuple[str, ...]] = ("x", "t")
    lower: ClassVar[tuple[float, ...]] = (0.0, 0.0)
    upper: ClassVar[tuple[float, ...]] = (2 * math.pi, 1.0)
    dirichlet_faces: ClassVar[tuple[tuple[int, int], ...]] = ((1, 0),)  # the initial line t = 0

    def residual(self, model: Model, points: Tensor) -> Tensor:
        beta = self.param
        x, u = _evaluate(model, points)
        du = _gradient(u, x)
        return du[:, 1] + beta * du[:, 0]

    def reference(self, points: Tensor) -> Tensor:
        import torch

        x, t = points[:, 0], points[:, 1]
        return torch.sin(x - self.param * t)

    def periodic_pairs(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(left, right): n points on x = 0 and the same times on x = 2 pi; the network should agree on them."""
        import torch

        t_lo, t_hi = self.lower[1], self.upper[1]
        t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=generator, dtype=dtype(), device=generator.device)
        left = torch.stack([torch.full_like(t, self.lower[0]), t], dim=1)
        right = torch.stack([torch.full_like(t, self.upper[0]), t], dim=1)
        return left, right


@dataclass(frozen=True)
class Helmholtz(PDEProblem):
    """u_xx + u_yy + k^2 u = q on [-1, 1]^2 with exact solution u = sin(a1 pi x) sin(a2 pi y); a1 = k = 1."""

    family: ClassVar[str] = "helmholtz"
    param_name: ClassVar[str] = "a2"
    default_param: ClassVar[float] = 4.0
    coords: ClassVar[tuple[str, ...]] = ("x", "y")
    lower: ClassVar[tuple[float, ...]] = (-1.0, -1.0)
    upper: ClassVar[tuple[float, ...]] = (1.0, 1.0)
    dirichlet_faces: ClassVar[tuple[tuple[int, int], ...]] = ((0, 0), (0, 1), (1, 0), (1, 1))
    a1: ClassVar[float] = 1.0
    k: ClassVar[float] = 1.0

    def residual(self, model: Model, points: Tensor) -> Tensor:
        x, u = _evaluate(model, points)
        du = _gradient(u, x)
        u_xx = _gradient(du[:, 0], x)[:, 0]
        u_yy = _gradient(du[:, 1], x)[:, 1]
        return u_xx + u_yy + self.k**2 * u - self.source(x.detach())

    def source(self, points: Tensor) -> Tensor:
        """q = (k^2 - (a1 pi)^2 - (a2 pi)^2) u_exact."""
        factor = self.k**2 - (self.a1 * math.pi) ** 2 - (self.param * math.pi) ** 2
        return factor * self.reference(points)

    def reference(self, points: Tensor) -> Tensor:
        import torch

        x, y = points[:, 0], points[:, 1]
        return torch.sin(self.a1 * math.pi * x) * torch.sin(self.param * math.pi * y)


@dataclass(frozen=True)
class Poisson(PDEProblem):
    """-(u_xx + u_yy) = f on [0, 1]^2 with exact solution u = sin(pi x) sin(freq pi y)."""

    family: ClassVar[str] = "poisson"
    param_name: ClassVar[str] = "freq"
    default_param: ClassVar[float] = 1.0
    coords: ClassVar[tuple[str, ...]] = ("x", "y")
    lower: ClassVar[tuple[float, ...]] = (0.0, 0.0)
    upper: ClassVar[tuple[float, ...]] = (1.0, 1.0)
    dirichlet_faces: ClassVar[tuple[tuple[int, int], ...]] = ((0, 0), (0, 1), (1, 0), (1, 1))

    def residual(self, model: Model, points: Tensor) -> Tensor:
        x, u = _evaluate(model, points)
        du = _gradient(u, x)
        u_xx = _gradient(du[:, 0], x)[:, 0]
        u_yy = _gradient(du[:, 1], x)[:, 1]
        return -(u_xx + u_yy) - self.source(x.detach())

    def source(self, points: Tensor) -> Tensor:
        """f = (1 + freq^2) pi^2 u_exact."""
        return (1 + self.param**2) * math.pi**2 * self.reference(points)

    def reference(self, points: Tensor) -> Tensor:
        import torch

        x, y = points[:, 0], points[:, 1]
        return torch.sin(math.pi * x) * torch.sin(self.param * math.pi * y)


FAMILIES: dict[str, type[PDEProblem]] = {cls.family: cls for cls in (Burgers, Convection, Helmholtz, Poisson)}
"""The known families by name; each class carries ``param_name`` and ``default_param``."""


def make_problem(family: str, param: float | None = None) -> PDEProblem:
    """The problem of the named family at ``param`` (the family's default when None)."""
    try:
        cls = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown PDE family {family!r}; known families: {', '.join(sorted(FAMILIES))}") from None
    return cls(cls.default_param if param is None else param)


# ---------------------------------------------------------------------------------------------------------------
# Burgers reference solution (Cole-Hopf)
# ---------------------------------------------------------------------------------------------------------------


def burgers_cole_hopf(x: Tensor, t: Tensor, nu: float, n_nodes: int = BURGERS_HERMITE_NODES) -> Tensor:
    """The exact solution of u_t + u u_x = nu u_xx, u(x, 0) = -sin(pi x), at the points (x_i, t_i), shape (N,).

    With eta = sqrt(4 nu t) z the Cole-Hopf integrals (module docstring) are Gauss-Hermite integrals
    sum_j w_j g(x - sqrt(4 nu t) z_j). The terms w_j f(x - sqrt(4 nu t) z_j) are formed in log space and scaled by
    their maximum (which cancels in the ratio), so nothing overflows. Written in torch ops: the result can be
    differentiated with autograd for t > 0.
    """
    import torch

    if nu < BURGERS_MIN_NU:
        raise ValueError(f"burgers: the Cole-Hopf quadrature is validated for nu >= 0.001/pi, got nu = {nu}")
    x, t = torch.broadcast_tensors(torch.as_tensor(x, dtype=dtype()), torch.as_tensor(t, dtype=dtype()))
    if bool((t < 0).any()):
        raise ValueError("burgers: the reference solution is defined for t >= 0 only")
    nodes, log_weights = (tensor.to(x.device) for tensor in _hermite_rule(n_nodes))

    blocks = []
    for start in range(0, x.shape[0], _BURGERS_CHUNK):
        xb, tb = x[start:start + _BURGERS_CHUNK], t[start:start + _BURGERS_CHUNK]
        y = xb[:, None] - torch.sqrt(4 * nu * tb)[:, None] * nodes[None, :]  # x - eta_j, shape (n, n_nodes)
        log_terms = log_weights - torch.cos(math.pi * y) / (2 * math.pi * nu)  # log(w_j f(x - eta_j))
        terms = torch.exp(log_terms - log_terms.max(dim=1, keepdim=True).values.detach())
        u = -(torch.sin(math.pi * y) * terms).sum(dim=1) / terms.sum(dim=1)
        blocks.append(torch.where(tb == 0, -torch.sin(math.pi * xb), u))  # the initial condition, exactly
    if not blocks:
        return torch.zeros(0, dtype=dtype(), device=x.device)
    return torch.cat(blocks)


@functools.lru_cache(maxsize=8)
def _hermite_rule(n_nodes: int) -> tuple[Tensor, Tensor]:
    """Nodes z_j and log weights log w_j of the n-point Gauss-Hermite rule (weight exp(-z^2)), float64 on the CPU.
    Cached and shared: do not modify."""
    import torch

    nodes, weights = np.polynomial.hermite.hermgauss(n_nodes)
    log_weights = np.log(weights)
    if not np.isfinite(log_weights).all():
        raise ValueError(f"the {n_nodes}-point Gauss-Hermite rule underflows in float64")
    return torch.tensor(nodes, dtype=dtype()), torch.tensor(log_weights, dtype=dtype())


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def relative_errors(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> dict[str, float]:
    """PINNacle's error metrics of a prediction against the reference (both flattened)."""
    import torch

    pred = torch.as_tensor(pred, dtype=dtype()).detach().reshape(-1)
    ref = torch.as_tensor(ref, dtype=dtype(), device=pred.device).detach().reshape(-1)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference differ in size: {pred.numel()} vs {ref.numel()}")
    error = pred - ref
    return {
        "l2re": float(torch.linalg.vector_norm(error) / torch.linalg.vector_norm(ref)),
        "l1re": float(error.abs().mean() / ref.abs().mean()),
        "maxe": float(error.abs().max()),
        "mse": float((error**2).mean()),
    }
