"""What ``dlrt`` and ``tdlrt`` share: the rank-adaptive integrator's minibatch loop, its truncation rule and its knobs.

Both methods (Schotthöfer et al., NeurIPS 2022; Zangrando et al., NeurIPS 2024; ``docs/algorithms.md#dlrt`` and
``#tdlrt``) take one minibatch in three stages, on every replaced layer at once:

1. *basis update* -- one forward/backward at the current weight; each layer reads the gradients of its K-form factors
   (K = U S, L = V S^T for a matrix; K_i per Tucker mode) from that single backward, takes an SGD step on them and
   augments each basis with the new K: U_hat = orth([K_new, U]) (``augment``);
2. *Galerkin step* -- a second forward/backward at the same weight written in the augmented bases, an SGD step on the
   augmented core (S_hat, C_hat) and on the layer's bias (``galerkin``); the network's other parameters take one step
   of the task's optimiser with this second pass's gradient (the reference steps everything that is not a low-rank
   factor once per minibatch, in its S phase, with the same gradient);
3. *truncation* -- by the SVD of the augmented core: the smallest rank whose discarded singular tail has 2-norm below
   ``tau`` times the norm of all singular values (``rankbench.kinds.layers.tail_rank``), clipped to [rank_min, rank
   cap] (``truncate``).

The loss of an epoch is the mean of the first pass's minibatch losses (the loss at the weights the step starts from,
as the reference logs it).

The step rule (``optimizer``). ``sgd`` (default; the papers' setting): every factor moves by ``- lr * grad``.
``adam``: the DLRT reference's ``dlr_opt(..., KLS_optim=torch.optim.Adam)``, which hands its K, L and S buffers (fixed
shapes, the largest the rank allows; the active block is the leading one) to one ``torch.optim.Adam``. So each factor
keeps Adam moments of that largest shape; a step's gradient fills the leading block of the factor's current shape
(zeros elsewhere), both moments decay everywhere, and the active block moves by Adam's bias-corrected step
(``IndexwiseAdam``). Moments are carried *index-wise* across basis changes and rank changes -- the moment of column j
of K stays with column j although the basis it refers to was re-orthogonalised and truncated -- exactly as the
reference's buffers carry them; nothing rotates them into the new bases (which would be a different method). The
layer bias is Adam-stepped with the second pass's gradient, as the reference's integrator steps it.

The knobs (``IntegratorParams``) and the trainer base (``IntegratorTrainer``) are in ``_integrator_trainer``, which
the plugin modules import without torch; this module holds the integrator and is imported when a run trains.

Knob names: ``tau`` here is the relative truncation tolerance (the DLRT reference code calls it ``theta`` and calls its
learning rate ``tau``); ``lr`` is the integrator's step size.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rankbench.api import Diverged
from rankbench.kinds.training import RankAdaptiveLayer


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def orth(M: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of M's columns: Q of the reduced QR (min(rows, cols) columns; orthonormal even when M is
    rank-deficient, Householder QR)."""
    return torch.linalg.qr(M.to(_work_dtype(M)), mode="reduced")[0].to(M.dtype)


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = torch.linalg.svd(M.to(_work_dtype(M)), full_matrices=False)
    return U.to(M.dtype), s.to(M.dtype), Vh.to(M.dtype)


def sgd(t: torch.Tensor, lr: float) -> torch.Tensor:
    """t - lr * t.grad, detached (t unchanged when it got no gradient)."""
    return t.detach() if t.grad is None else (t - lr * t.grad).detach()


class IndexwiseAdam:
    """Adam moments for factors whose shape changes between steps (module docstring, step rule ``adam``): per factor
    name, first and second moments grown with zeros to cover every shape seen, decayed in full at each step, and a
    bias-corrected step (torch.optim.Adam's update, no weight decay, no amsgrad) on the leading block."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.state: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def step(self, name: str, t: torch.Tensor, lr: float) -> torch.Tensor:
        """``t`` after one Adam step along ``t.grad`` (detached; unchanged, and no step counted, without a grad)."""
        if t.grad is None:
            return t.detach()
        grad = t.grad.detach()
        m, v, count = self.state.get(name, (grad.new_zeros(grad.shape), grad.new_zeros(grad.shape), 0))
        if m.dim() != grad.dim():
            raise ValueError(f"factor {name!r} changed its number of modes ({m.dim()} -> {grad.dim()})")
        shape = tuple(max(a, b) for a, b in zip(m.shape, grad.shape))
        m, v = _grown(m, shape), _grown(v, shape)
        block = tuple(slice(0, n) for n in grad.shape)
        full = grad.new_zeros(shape)
        full[block] = grad
        b1, b2 = self.betas
        count += 1
        m.mul_(b1).add_(full, alpha=1 - b1)
        v.mul_(b2).addcmul_(full, full, value=1 - b2)
        self.state[name] = (m, v, count)
        denom = (v[block].sqrt() / math.sqrt(1 - b2**count)).add_(self.eps)
        return (t.detach() - (lr / (1 - b1**count)) * m[block] / denom).detach()


def _grown(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


class IntegratorLayer(RankAdaptiveLayer):
    """A layer the integrator drives: ``begin_basis_step`` (the next forward is the K-step pass), ``augment(lr)``,
    ``galerkin(lr)``, ``truncate(tau)``. It has ``in_features``, ``out_features`` and ``bias``; ``product`` applies
    its weight to a batch of rows."""

    in_features: int
    out_features: int
    bias: torch.nn.Parameter | None

    @abstractmethod
    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for x (batch x in), through the K-form during a K-step pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.product(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @abstractmethod
    def begin_basis_step(self) -> None:
        """Make the next forward the K-step pass (gradients reach the K forms)."""

    @abstractmethod
    def augment(self, lr: float) -> None:
        """K-step: update the K forms with step ``lr`` and augment the bases with their new directions."""

    @abstractmethod
    def galerkin(self, lr: float) -> None:
        """S-step: a gradient step of the coefficients in the augmented bases."""

    @abstractmethod
    def truncate(self, tau: float) -> None:
        """Truncate the ranks by the method's tolerance rule at ``tau`` (see each layer's docstring)."""

    adam: IndexwiseAdam | None = None  # the step rule: None = SGD (``IntegratorParams.optimizer``)

    def descend(self, name: str, t: torch.Tensor, lr: float) -> torch.Tensor:
        """``t`` moved one step of the layer's rule along ``t.grad`` (SGD, or Adam with index-wise moments)."""
        return sgd(t, lr) if self.adam is None else self.adam.step(name, t, lr)

    def _step_bias(self, lr: float) -> None:
        bias = getattr(self, "bias", None)
        if bias is None or bias.grad is None:
            return
        if self.adam is None:
            bias.data.add_(bias.grad, alpha=-lr)
        else:
            bias.data.copy_(self.adam.step("bias", bias, lr))


def integrator_step(model: torch.nn.Module, layers: Sequence[IntegratorLayer], loss_fn: Callable[[], torch.Tensor],
                    lr: float, tau: float, optimizer: Any = None) -> float:
    """One minibatch of the rank-adaptive integrator (stages 1-3 above); returns the first pass's loss."""
    model.zero_grad(set_to_none=True)
    for layer in layers:
        layer.begin_basis_step()
    loss = loss_fn()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise Diverged(f"training loss is {value}")
    loss.backward()
    with torch.no_grad():
        for layer in layers:
            layer.augment(lr)
    model.zero_grad(set_to_none=True)  # the first pass's bias and network gradients are not used
    loss_fn().backward()
    with torch.no_grad():
        for layer in layers:
            layer.galerkin(lr)
            layer.truncate(tau)
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return value
