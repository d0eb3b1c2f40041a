"""Solver ``altmin``: alternating least squares for matrix completion (Jain, Netrapalli & Sanghavi, "Low-rank matrix
completion using alternating minimization", STOC 2013).

    U0 = U_k S_k^{1/2}, V0 = V_k S_k^{1/2} from the top-k SVD of P_Omega(Y) / p
    repeat:
        V <- argmin_V ||P_Omega(U V^T - Y)||_F^2 + reg ||V||_F^2      one k x k least-squares problem per column
        U <- argmin_U ||P_Omega(U V^T - Y)||_F^2 + reg ||U||_F^2      one k x k least-squares problem per row

Column j solves (sum_{i in Omega_j} u_i u_i^T + reg I) v_j = sum_{i in Omega_j} Y_ij u_i. All n2 (then n1) Gram
matrices are formed at once as mask^T (u_i u_i^T)_i, a single (n2 x n1) by (n1 x k^2) matrix product, and solved
with one batched Cholesky factorisation. ``reg`` is an absolute ridge added for conditioning (rows or columns with
fewer than k observations). The paper's sample splitting and row clipping are omitted (an outline of the method,
unverified against the paper, is in ``docs/algorithms.md#alternating-minimisation``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench_plugins.solvers._factored import FactoredSolver

if TYPE_CHECKING:
    import torch


def least_squares_rows(mask: torch.Tensor, Y: torch.Tensor, F: torch.Tensor, reg: float) -> torch.Tensor:
    """For each row i of Y: argmin_g sum_{j: mask_ij} (Y_ij - <g, F_j>)^2 + reg ||g||^2 (batched)."""
    import torch

    n, k = F.shape
    outer = (F[:, :, None] * F[:, None, :]).reshape(n, k * k)
    gram = (mask @ outer).reshape(-1, k, k) + reg * torch.eye(k, dtype=F.dtype, device=F.device)
    rhs = (mask * Y) @ F
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info > 0).any()):
        return torch.linalg.lstsq(gram, rhs.unsqueeze(-1)).solution.squeeze(-1)
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


class AltMin(FactoredSolver):
    name = "altmin"
    version = "1"
    description = "Alternating least squares for matrix completion (Jain-Netrapalli-Sanghavi 2013)"
    problems = frozenset({"completion", "ratings"})

    class Params(PluginParams):
        reg: float = Field(1e-9, ge=0, description="absolute ridge added to every k x k Gram matrix")
        rank_multiplier: int = Field(1, ge=1, description="fit rank x rank_multiplier columns")

    def init(self, start):
        return start.spectral()

    def updater(self, start):
        mask, Y, reg = start.obj.mask, start.obj.Y, self.params.reg

        def update(U, V, t):
            V = least_squares_rows(mask.T, Y.T, U, reg)
            return least_squares_rows(mask, Y, V, reg), V

        return update


@hookimpl
def rankbench_register_factorizations(register):
    register(AltMin)
