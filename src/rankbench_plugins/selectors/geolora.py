"""``geolora``: GeoLoRA -- Schotthöfer, Zangrando, Ceruti, Tudisco and Kusch, "GeoLoRA: Geometric integration for
parameter efficient fine-tuning", ICLR 2025 (arXiv 2410.18720); ``docs/algorithms.md#geolora``. Problem kind
``adaptation`` only: a rank-adaptive dynamical low-rank integrator (the parallel basis-update & Galerkin integrator
of Ceruti, Kusch and Lubich) drives the adapters; the rank of every site is what its truncation keeps (no budget is
read: the host runs it once, budget null).

Adapter. dW = scaling * U S V^T with U (out x r), V (in x r) orthonormal and S (r x r); after every step S is
diagonal, so the adapter is this repo's scaling * P diag(E * mask) Q with P[:, :r] = U, E[:r] = diag(S),
Q[:r] = V^T and mask[:r] = 1 (``kinds.adaptation``; the slots beyond r are zero and masked). The capacity is the
adapter's ``init_rank`` (``lora``); the integrator starts at ``start_rank`` (None: all of it).

One step (one forward/backward of the task loss at W = W0 + dW, G = dL/d(dW)):

    G_K = scaling G V,  G_L = scaling G^T U,  G_S = scaling U^T G V        (gradients of K = U S, L = V S^T and S)
    U_hat = [U, U~] = orth([U, G_K]),   V_hat = [V, V~] = orth([V, G_L])          (2r columns: the augmentation)
    K1 = U S - h G_K,   L1 = V S^T - h G_L
    S_hat = [[ S - h G_S,          L1^T V~ = -h G_L^T V~ ],
             [ U~^T K1 = -h U~^T G_K,        0           ]]
    P_s diag(d) Q_s^T = svd(S_hat);   r_new = min{ j : ||d[j:]||_2 < tau ||d||_2 }, clipped to [rank_min, capacity]
    U := U_hat P_s[:, :r_new],   V := V_hat Q_s[:, :r_new],   S := diag(d[:r_new])

with step size h (``lr``; None: the task's adapter learning rate) -- the paper's Algorithm 1 and the authors'
``LoRAParallelDLRT.step``/``Truncate`` (which also uses G_U S^{-1} = scaling G V, as here). All factors move from
the same single gradient evaluation (no second pass, unlike ``dlrt``'s augmented BUG).

Reading the gradients. The adapter's own parameters give scaling G V diag(e) (P's gradient), scaling diag(e) U^T G
(Q's) and diag(G_S) (E's). So G_K = P.grad diag(1/e) and G_L = Q.grad^T diag(1/e) on the components with e != 0 (the
authors multiply by S^{-1} the same way), and the entry (i, j) of G_S is read from the column of a nonzero e_j or the
row of a nonzero e_i; only entries with e_i = e_j = 0, i != j, are unknown and set to 0 -- at a start from E = 0
(``lora``'s ``init: gaussian``; the authors start from S = 0, where G_K = G_L = 0 too) the first step moves diag(S)
alone instead of all of S. From then on the truncation leaves d > 0 on every kept component (unless ``rank_min``
keeps zero singular values), so the step is exact.

Defaults (the authors' GLUE scripts): tau = 0.15, rank_min = 2 (clipped to the capacity), step size = the learning
rate, ``optimizer: sgd``. The adapters' orthogonality regulariser is switched off in the cells of this selector
(the trainer's ``orth_reg := 0``): U and V are orthonormal by construction, the regulariser is not part of the
method, and its gradient would enter the P and Q gradients the step reads.

Honest deviations. (1) ``optimizer: sgd`` (default) takes plain steps of size h on the whole augmented system
(the authors' code); ``optimizer: adam`` replaces each h G block (G_K, G_L, G_S) by Adam's bias-corrected step with
moments per block of the capacity's shape, carried index-wise across basis changes (as the DLRT reference's
``dlr_opt`` with Adam does) -- an option of this repo for badly conditioned losses (PINNs), not the paper's.
(2) The augmentation always doubles the bases (to 2r columns, fewer only where the weight has fewer rows or
columns) and only the truncation is capped at the capacity, as in the paper's algorithm; the authors' code, whose
buffers have the maximal rank, clips the augmentation at that rank, so an adapter at its maximal rank there never
moves its bases. (3) The scaling alpha / init_rank stays fixed (the authors' code resets it to alpha / r after each
truncation, which changes the adapted function). (4) The missing G_S entries at zero e described above. (5) The
capacity is the adapter's init_rank (the authors' ``max_rank``); ``start_rank`` None starts at the capacity (the
authors start below it, e.g. 8 of 16: set ``start_rank`` and ``lora.init_rank`` so). A start below a nonzero update
(``init: pissa``) keeps the leading ``start_rank`` triplets of that update (exact re-parameterisation; the rest is
dropped, and the PiSSA residual weight does not hold it).

Rank-determination points: the state after the last step is recorded (``mark_determination``) with the total
rank; the trainer's ``rank_total`` curve samples the truncations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from rankbench.api import ADAPTATION, RANK_TOTAL, PluginParams, RankProblem, Ranks, Selector, hookimpl
from rankbench.kinds.adaptation import AdapterTrainer

if TYPE_CHECKING:
    import torch

    from rankbench.kinds.layers import SVDAdapter


def core_gradients(adapter: SVDAdapter, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G_K = scaling G V, G_L = scaling G^T U, G_S = scaling U^T G V) of the active r components, read from the
    adapter's P, Q, E gradients (see the module docstring; float64)."""
    import torch

    f64 = torch.float64
    e = adapter.E.detach()[:r].to(f64)
    U, V = adapter.P.detach()[:, :r].to(f64), adapter.Q.detach()[:r].T.to(f64)

    def grad(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=f64) if p.grad is None else p.grad.detach().to(f64)

    gP, gQ, gE = grad(adapter.P)[:, :r], grad(adapter.Q)[:r], grad(adapter.E)[:r]
    alive = e != 0
    inverse = torch.where(alive, 1.0 / torch.where(alive, e, torch.ones_like(e)), torch.zeros_like(e))
    G_K = gP * inverse  # scaling G V on the columns with e != 0, else 0
    G_L = gQ.T * inverse  # scaling G^T U likewise
    from_columns = U.T @ G_K  # G_S[:, j] for e_j != 0
    from_rows = (V.T @ G_L).T  # G_S[i, :] for e_i != 0
    G_S = torch.where(alive[None, :], from_columns, torch.where(alive[:, None], from_rows, torch.zeros_like(from_rows)))
    G_S.diagonal().copy_(gE)
    return G_K, G_L, G_S


class SGDSteps:
    """The step of a gradient block: h * G (the paper's and the authors' plain gradient step)."""

    def __init__(self, h: float):
        self.h = float(h)

    def __call__(self, key: tuple[str, str], grad: torch.Tensor, capacity: tuple[int, int]) -> torch.Tensor:
        return self.h * grad


class AdamSteps:
    """``optimizer: adam``: the step of a gradient block is Adam's bias-corrected h m_hat / (sqrt(v_hat) + eps), with
    moments per (site, block) of the capacity's shape, the gradient filling the leading block (zeros elsewhere) and
    the moments carried index-wise across basis changes and truncations (as the DLRT reference's buffers are)."""

    def __init__(self, h: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.h, self.betas, self.eps = float(h), betas, float(eps)
        self.state: dict[tuple[str, str], list] = {}

    def __call__(self, key: tuple[str, str], grad: torch.Tensor, capacity: tuple[int, int]) -> torch.Tensor:
        b1, b2 = self.betas
        if key not in self.state:
            self.state[key] = [grad.new_zeros(capacity), grad.new_zeros(capacity), 0]
        m, v, count = self.state[key]
        full = grad.new_zeros(capacity)
        block = (slice(0, grad.shape[0]), slice(0, grad.shape[1]))
        full[block] = grad
        count += 1
        m.mul_(b1).add_(full, alpha=1 - b1)
        v.mul_(b2).addcmul_(full, full, value=1 - b2)
        self.state[key][2] = count
        denom = v[block].sqrt() / (1 - b2**count) ** 0.5 + self.eps
        return (self.h / (1 - b1**count)) * m[block] / denom


def geolora_step(adapter: SVDAdapter, steps, tau: float, rank_min: int, name: str = "") -> int:
    """One augment-step-truncate of the parallel integrator on ``adapter`` (gradients in ``.grad``); ``steps`` turns
    a gradient block into its step (``SGDSteps``: h G; ``AdamSteps``); returns the new rank. The active components
    are the leading ``adapter.rank`` slots."""
    import torch

    from rankbench.kinds.layers import clip_rank, tail_rank

    cap, r = adapter.init_rank, adapter.rank
    if cap == 0 or r == 0:
        return r
    f64 = torch.float64
    G_K, G_L, G_S = core_gradients(adapter, r)
    out_features, in_features = adapter.base.weight.shape
    step_K = steps((name, "K"), G_K, (out_features, cap))
    step_L = steps((name, "L"), G_L, (in_features, cap))
    step_S = steps((name, "S"), G_S, (cap, cap))
    U, V = adapter.P.detach()[:, :r].to(f64), adapter.Q.detach()[:r].T.to(f64)
    e = adapter.E.detach()[:r].to(f64)
    # augmented to 2r columns (fewer only where the weight has fewer rows or columns), truncated to the capacity
    U_new = torch.linalg.qr(torch.cat([U, step_K], dim=1), mode="reduced")[0][:, r : min(2 * r, out_features)]
    V_new = torch.linalg.qr(torch.cat([V, step_L], dim=1), mode="reduced")[0][:, r : min(2 * r, in_features)]
    S_hat = torch.zeros(r + U_new.shape[1], r + V_new.shape[1], dtype=f64, device=U.device)
    S_hat[:r, :r] = torch.diag(e) - step_S
    S_hat[r:, :r] = -U_new.T @ step_K
    S_hat[:r, r:] = -step_L.T @ V_new
    Ps, d, Qsh = torch.linalg.svd(S_hat, full_matrices=False)
    k = clip_rank(tail_rank(d, tau), rank_min, cap)
    write_factors(adapter, torch.cat([U, U_new], 1) @ Ps[:, :k], d[:k], Qsh[:k] @ torch.cat([V, V_new], 1).T)
    return k


def write_factors(adapter: SVDAdapter, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> None:
    """P[:, :k] = U, E[:k] = s, Q[:k] = Vh, mask = leading k; the other slots zero."""
    import torch

    k = int(s.numel())
    with torch.no_grad():
        for part in (adapter.P, adapter.E, adapter.Q):
            part.zero_()
        adapter.P[:, :k] = U.to(adapter.P.dtype)
        adapter.E[:k] = s.to(adapter.E.dtype)
        adapter.Q[:k] = Vh.to(adapter.Q.dtype)
        adapter.mask.zero_()
        adapter.mask[:k] = 1.0


def start_factors(adapter: SVDAdapter, k: int) -> None:
    """Orthonormal start at rank k: the SVD of the current update (exact when its rank is <= k) or, when the update
    is zero, orthonormalised leading k columns of P and rows of Q with S = 0."""
    import torch

    k = max(0, min(int(k), adapter.init_rank))
    with torch.no_grad():
        if bool((adapter.effective_e() != 0).any()):
            adapter.truncate(k)
            return
        U = torch.linalg.qr(adapter.P.detach()[:, :k].to(torch.float64), mode="reduced")[0]
        V = torch.linalg.qr(adapter.Q.detach()[:k].T.to(torch.float64), mode="reduced")[0]
        write_factors(adapter, U, torch.zeros(k, dtype=torch.float64), V.T)


class GeoLoRAIntegrator:
    """Stands in for the trainer's optimiser: ``step()`` applies ``geolora_step`` to every adapter with the gradients
    of the trainer's backward pass; the parameters the task trains beside the adapters (a classification head) take
    Adam steps at the trainer's rate, as in every other cell."""

    def __init__(self, trainer: AdapterTrainer, h: float, tau: float, rank_min: int, optimizer: str = "sgd"):
        import torch

        self.trainer, self.tau, self.rank_min = trainer, float(tau), int(rank_min)
        self.steps = AdamSteps(h) if optimizer == "adam" else SGDSteps(h)
        extra = trainer.extra_params
        self.beside = torch.optim.Adam(extra, lr=trainer.lr) if extra else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for adapter in self.trainer.adapters.values():
            for p in (adapter.P, adapter.E, adapter.Q):
                p.grad = None
        if self.beside is not None:
            self.beside.zero_grad(set_to_none=True)

    def step(self) -> None:
        for name, adapter in self.trainer.adapters.items():
            geolora_step(adapter, self.steps, self.tau, self.rank_min, name)
        if self.beside is not None:
            self.beside.step()


class GeoLoRASelector(Selector):
    name = "geolora"
    version = "1"
    description = (
        "GeoLoRA: rank-adaptive LoRA by the parallel dynamical low-rank integrator (basis augmentation with the"
        " gradient, one backward pass, truncation of the core's singular values at tolerance tau; adaptation)."
    )
    problem_kinds: ClassVar[frozenset[str]] = frozenset({ADAPTATION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({RANK_TOTAL, None})

    class Params(PluginParams):
        tau: float = Field(0.15, ge=0.0, lt=1.0, description="relative truncation tolerance on the core's singular "
                           "values (authors' GLUE: 0.15)")
        lr: float | None = Field(None, gt=0.0, description="step size h of the integrator (None: the task's adapter "
                                 "learning rate)")
        rank_min: int = Field(2, ge=1, description="smallest rank a truncation keeps (authors': 2; clipped to the "
                              "capacity)")
        start_rank: int | None = Field(None, ge=1, description="rank at the start (None: the adapter's init_rank)")
        optimizer: Literal["sgd", "adam"] = Field(
            "sgd", description="step of the gradient blocks G_K, G_L, G_S: h G (sgd, the paper's) or Adam's "
            "(moments index-wise per block, as DLRT's reference)")

    def uses_budget(self, budget_kind: str | None) -> bool:
        return False

    def adapt(self, problem: RankProblem, trainer: AdapterTrainer) -> dict[str, int]:
        """Integrate every step of the cell with GeoLoRA (see the module docstring)."""
        for adapter in trainer.adapters.values():
            start = adapter.init_rank if self.params.start_rank is None else self.params.start_rank
            start_factors(adapter, start)
        trainer.rank_curve.append((trainer.step_count, trainer.rank_total()))
        trainer.orth_reg = 0.0
        step = trainer.lr if self.params.lr is None else self.params.lr
        trainer.optimizer = GeoLoRAIntegrator(trainer, step, self.params.tau, self.params.rank_min,
                                              self.params.optimizer)
        trainer.train(trainer.steps_left)
        trainer.mark_determination(rank_total=trainer.rank_total())
        return {name: a.rank for name, a in trainer.adapters.items()}

    def select(self, problem: RankProblem) -> Ranks:
        raise TypeError("geolora integrates the adapters while fine-tuning (adapt); it has no post-hoc rule")


@hookimpl
def rankbench_register_selectors(register):
    register(GeoLoRASelector)
