"""``bayes-tensor``: tensorized layers whose ranks are learned by automatic relevance determination (ARD) while the
network trains -- Hawkins & Zhang, "Bayesian Tensorized Neural Networks with Automatic Rank Selection" (arXiv
1905.10478, Neurocomputing 2021) and Hawkins, Liu & Zhang, "Towards Compact Neural Networks via End-to-End Training: A
Bayesian Tensor Approach with Automatic Rank Determination" (arXiv 2010.08689, SIAM J. Math. Data Sci. 2022);
``docs/algorithms.md#bayesian-tensorized-networks``. Reference code: colehawkins/bayesian-tensor-rank-determination
(``tensor_layers`` and the MNIST script), whose semantics are followed where they differ from the papers (noted below).
Two modes (``inference``): ``map`` (default), the reference code's MAP training, and ``svi``, the variational
posterior of arXiv 2010.08689 fitted by stochastic variational inference with Pyro (``pyro-ppl``). ``map`` stays the
default so that every existing cell (and the suite's kl_multiplier rows) keeps its numbers; ``svi`` is the paper's
method and is asked for explicitly.

Model
-----
Every site (a Linear, W: out x in) is replaced by a layer in the cell's format (``cp``, ``tucker``, ``tt``, ``ttm``;
the format plugin's ``dims`` give the tensor modes, output modes first) allocated at ``max_rank`` in every rank slot
(clipped to the format's feasible ranks). Each rank component r of a slot has a prior variance s_r^2, and every
factor entry x of that component's group G_r is

    x ~ N(0, s_r^2),        |G_r| = D,   M_r = sum_{x in G_r} x^2,                                           (1)

with the groups of the reference code:

* ``cp``: one slot; component r = column r of every factor matrix A_k (D = sum_k n_k). The CP weights lambda are
  held fixed at 1 (a buffer, as the reference has no lambda), so the scale cannot escape the prior.
* ``tucker``: one slot per mode k; component r = column r of U_k (D = n_k). As in the reference, the core carries no
  prior term (the reference declares an N(0, 10^2) core prior but leaves it out of its KL). Pruning component r of
  mode k zeroes U_k[:, r] and the core slice r along mode k.
* ``tt`` / ``ttm``: one slot per bond k (between cores k and k+1); component r = the slice G_k[..., r] of the core
  on the bond's left (D = r_{k-1} n_k, n_k = o_k i_k for ``ttm``), and for the last bond also the slice
  G_N[r, ...] of the last core (D += n_N). Every core thus belongs to exactly one bond: the bond on its right, the
  last core to the bond on its left. Pruning component r of bond k zeroes both slices the bond touches
  (G_k[..., r] and G_{k+1}[r, ...]). D counts the allocated (max-rank) slices, as the reference does.

Hyper-prior on the scale s_r (``prior``): log-uniform, p(s) ∝ 1/s (default), or half-Cauchy, p(s) ∝ 1/(1 + s^2/eta^2).

Training, ``inference = map`` (as the reference code does it)
------------------------------------------------------------
The papers fit a posterior (SVI in 2010.08689, Stein variational GD in 1905.10478). The reference code -- and this
mode -- computes a MAP point estimate: q(factors) is a point mass (the reference keeps a Gaussian with a fixed
standard deviation of 1e-9, whose KL to the prior is the negative log prior up to a constant). Per minibatch, with
the task's optimiser over all parameters (one step):

    loss = task loss (the task's ``batch_loss``, e.g. the mean NLL of the batch)
           + kl_mult(epoch) * sum_layers sum_slots sum_r  1/2 (M_r / s_r^2 + D log(2 pi s_r^2))               (2)
    kl_mult(epoch) = kl_multiplier * clamp((epoch - no_kl_epochs) / warmup_epochs, 0, 1)                      (3)

i.e. the reference's scaling: the batch-mean NLL plus ``kl_multiplier`` times the prior term summed over all factor
entries (not divided by the dataset size; ``kl_multiplier`` ~ 1 / n_train would be the exact posterior for an NLL
loss -- the MNIST script's 5e-5 is about 3 / 60000). The s_r^2 are not trained by the optimiser: on every training
forward pass, before the layer's output is computed (as the reference), each is set by the closed-form EM update,
the maximiser over s of the log joint log N(G_r | 0, s^2) + log p(s) at the current factors:

    log-uniform:  s_r^2 <- M_r / (D + 1)                                                                      (4)
    half-Cauchy:  s_r^2 <- (M_r - D eta^2 + sqrt(M_r^2 + (2D + 8) eta^2 M_r + eta^4 D^2)) / (2D + 4)           (5)
    damped:       s_r^2 <- (1 - em_stepsize) s_r^2 + em_stepsize * update                                      (6)

((5) is the positive root of (D + 2) v^2 + (D eta^2 - M) v - M eta^2 = 0, evaluated in a cancellation-free form.)
The rank of a slot is #{r : s_r^2 > threshold}. With ``prune="epoch"`` (default) components below the threshold
are masked permanently at the end of every epoch (their slices zeroed and kept at zero after every optimiser step),
so rank curves are non-increasing and the trained network is the network evaluated; ``prune="end"`` follows the
MNIST script (which never masks during training and reports #{s^2 > threshold} each epoch) and masks only once,
after the last epoch. Either way the evaluated network has the pruned components zeroed, and a slot always keeps
its largest component (a layer never vanishes). ``ranks()`` are the surviving counts clipped to the format's feasible
set; ``stored_params()`` is the format's ``params_at_ranks`` at them (bias excluded).

A property of this MAP objective (reference grouping, improper hyper-prior) worth knowing: with s_r^2 at (4), the
prior term's gradient in the factors is that of sum_r (D + 1)/2 log M_r, which is not invariant under the gauge of a
TT bond (scale a core by c, its neighbour by 1/c: W is unchanged, the penalty changes by (differences of D) log c);
it is unbounded below along it, and scale drifts towards the core with the smallest groups (in the tests the first
core), while the other cores' s^2 shrink
towards the absolute threshold; long or fast training can then prune components the fit needs (seen in the tests at
Adam lr 1e-2). ``balance`` (off by default, not in the reference) removes the drift for ``tt`` / ``ttm``: after
every epoch each bond component's two core slices G_k[..., r] and G_{k+1}[r, ...] are rescaled to equal RMS entry
(W unchanged) and s^2 re-estimated. (For ``cp`` the single group per component already fixes the gauge; for
``tucker`` the core has no prior, so moving scale from U_k into the core is what the prior asks for and is left
alone.) Also observed: with the reference grouping a TT bond's left slices can stay large while the component's
right slices vanish, so the first TT bond tends to keep a surplus component or two that contribute nothing.

Initialisation (``init``): ``site`` (default) and ``kaiming`` draw every factor entry from a normal truncated at
+-3 sigma, with sigma chosen so that an entry of the reconstructed weight has standard deviation ``target`` (the
reference's "nn" init: CP sigma^N = target / sqrt(R); Tucker sigma^(2(N+1)) prod r_k = target^2; TT / TTM
sigma^(2 cores) prod_k r_k = target^2 over the internal ranks); ``target`` is the standard deviation of the site's
initial dense weight for ``site`` (the task's own initialisation scale, so the dense reference and this method start
at the same weight scale) and sqrt(2 / in) for ``kaiming`` (the reference's choice). The reference truncates at 3
sigma (CP), 4 sigma (TTM) or N sigma (TT, Tucker). ``fit`` instead fits the site's initial dense weight at the max
ranks with the format's ``fit`` (CP weights folded into the factors); a random matrix is far from low rank, so the
fit keeps only part of it and its spectrum -- the random init is the reference's and the default.

Schedule scaling: the MNIST script trains 100 epochs with no_kl_epochs = 5 and warmup_epochs = 50. Our budgets are
~10-20 epochs, so the defaults are the same fractions of the task's epoch budget E: no_kl_epochs = 0.05 E and
warmup_epochs = 0.5 E (``no_kl_fraction``, ``warmup_fraction``); ``no_kl_epochs`` / ``warmup_epochs`` set absolute
numbers instead. (3) is evaluated once per epoch, epochs counted from 1 as in the script (warmup 0: a step).
Other defaults from the MNIST script / ``TensorizedLinear``: max_rank 20 (its CP run uses 50), kl_multiplier 5e-5
(TT and CP; Tucker 5e-4..5e-5 and TTM 5e-5..5e-6 were also run), log-uniform prior, em_stepsize 1, threshold 1e-5,
eta 1 (the script's default; the DLRM runs use 0.01-0.1). The optimiser and learning rate are the task's (the
script: Adam, lr 1e-3).

The ``train_loss`` curve records the task loss (without the prior term), comparable with the dense reference.

Training, ``inference = svi`` (the paper's variational Bayes)
-------------------------------------------------------------
What arXiv 2010.08689 states (abstract; its method section could not be consulted here): a Bayesian model with
low-rank (rank-shrinking) priors for CP, Tucker, TT and TTM layers, and a scalable stochastic variational inference
solver that trains the tensorized network end to end and determines the ranks. What the reference code has (not
used by its layers, which pass ``learned_scale=False``): per factor entry a Gaussian N(mean, std) with a trainable
std, the closed-form KL of that Gaussian to the prior, and the EM update (4) / (5) with M_r = sum (mean^2 + std^2).
This mode implements that model by SVI:

    p(s_r)              log-uniform or half-Cauchy, as above (s_r: a point estimate, q(s) a point mass)
    p(x | s_r)          N(0, s_r^2) for every entry x of group G_r, as in (1)
    q(x)                N(mu_x, sigma_x^2), mean field over all prior-carrying entries;
                        mu_x the format layer's own parameter, sigma_x = softplus(rho_x)
    log p(D | factors)  -N * (the task's batch_loss), batch_loss the mean loss over the minibatch            (7)
    ELBO(q, s) = E_q[log p(D | factors)] - beta(epoch) * [ sum_r KL(q(G_r) || N(0, s_r^2 I)) - log p(s) ]      (8)

with N the training examples per epoch (``data_size``; by default counted from the first epoch's batches: the leading
dimension of each batch, or of its first element for (x, y) batches -- tasks with other batches, e.g. PINN
collocation sets, must set it). (7) is the exact log-likelihood when the task's loss is a mean NLL: for the
classification tasks F.cross_entropy's batch mean, so -N * loss is the categorical log-likelihood of the logits
(minibatch-estimated); for an MSE loss it is a Gaussian likelihood with variance d_out / 2, a tempered one. The
factors not under the prior -- the Tucker core, the CP weights (fixed at 1), biases, every parameter outside the
sites -- are point estimates (maximum likelihood under (7)). beta(epoch) is (3) with kl_multiplier replaced by
``kl_weight`` (1: the ELBO; the same no-KL and warm-up fractions), applied to the KL and hyper-prior together.

Pyro: the model draws every factor from its prior (``pyro.sample`` of a masked Normal per factor tensor), adds the
hyper-prior as a ``pyro.factor``, runs the network -- each site's forward contracts the drawn factors with the
format's own contraction -- and adds (7) as ``pyro.factor``; the guide draws from q (reparameterised). Per minibatch
and step: s^2 <- the closed-form update (4) / (5) at M_r = sum_{G_r} (mu^2 + sigma^2), D_r = the live entries of G_r
(the exact maximiser of (8) over s_r, so EM coordinate ascent), damped by (6); then one step of the task's
optimiser on -ELBO / N as estimated by ``TraceMeanField_ELBO`` (closed-form Normal-Normal KL; ``estimator = trace``:
``Trace_ELBO``, the Monte Carlo KL) with one draw from q for the minibatch. Pyro's ``SVI`` class is not used because
the training kind owns the optimiser (``run.optimizer``: the task's optimiser and learning rate, as every trainer),
and ``SVI`` steps a ``pyro.optim`` wrapper over Pyro's parameter store; the ELBO objects' ``differentiable_loss`` is
Pyro's interface for exactly that, and no global parameter store is touched. The rho take no weight decay (AdamW
would pull sigma towards softplus(0)). sigma starts at ``posterior_scale`` (1e-2) x each factor's initial RMS entry;
mu at the initialisation of the MAP mode.

Pruning and evaluation: after every epoch (``prune = epoch``) component r of a slot is masked for good when s_r^2 <=
``threshold`` (1e-5, absolute, as the reference) or s_r^2 <= ``relative_threshold`` x the slot's largest s^2 (default
0.05 in this mode); masked entries leave the model, the guide, M_r and D_r. The evaluated network uses the posterior
mean of the factors (mu, pruned components zeroed) -- which gives the posterior mean E_q[W] of every weight exactly
(W is multilinear in independent factors) -- not an average of the network over draws. The ``elbo`` curve records per
epoch the mean over its minibatches of the per-example ELBO at beta = 1: -(task loss at the draw) - (KL - log p(s)) / N.

Deviations and observations (svi). (a) q(s) is a point mass and s is updated in closed form (the reference's EM;
whether the paper does the same is not checked here). (b) The relative threshold is ours: with the exact ELBO the
idle components' s^2 fall only slowly -- for an idle component sigma ~ s, and the EM fixed point s^2 = (sum mu^2 +
sum sigma^2) / (D + 1) moves s only as fast as the optimiser moves sigma, a factor D / (D + 1) per step at best,
while Adam's step noise keeps mu ~ lr -- so on the planted-rank tests they stall at ~1e-3 while the needed ones sit
at ~0.1: 100x below, yet far above 1e-5. (c) Also seen there (Gaussian likelihood at the true noise, 256 examples,
no warm-up, Adam lr 1e-2): TT separates fastest (planted (2, 2, 2) in 100 epochs); CP and TTM need ~200 epochs;
Tucker (groups of only n_k entries, a core without a prior) did not separate within 200 epochs at kl_weight 1 (and
collapsed to rank 1 at 30). (d) One draw of the factors per minibatch, shared by its examples (no local
reparameterisation). (e) The objective is divided by N so that the task's learning rate applies as it does to its
mean loss.

Compression metrics (both modes): ``start_params`` (stored parameters at the allocated max ranks),
``start_param_ratio`` (that over dense) and ``param_ratio_vs_start`` (stored at the final ranks over start_params), so
``param_ratio`` = start_param_ratio x param_ratio_vs_start splits the compression into the format's share and rank
determination's share.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field, model_validator
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds import tensor_formats as tf
from rankbench.kinds.tensor_compression import TensorFactorization
from rankbench.kinds.training import RankAdaptiveLayer, RankAdaptiveTrainer, TrainingRun

PRIORS = ("log_uniform", "half_cauchy")
_TRUNCATE = 3.0  # the random init's truncation, in standard deviations


def em_update(M: torch.Tensor, D: float, prior: str, eta: float = 1.0) -> torch.Tensor:
    """The EM (MAP) update of s^2 for groups of D entries with squared sums M: (4) or (5)."""
    if prior == "log_uniform":
        return M / (D + 1.0)
    if prior != "half_cauchy":
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    # positive root of a v^2 - b v - c = 0, a = D + 2, b = M - D eta^2, c = M eta^2; for b < 0 in the rationalised
    # form 2c / (sqrt(b^2 + 4ac) - b), which avoids the cancellation of (5) when M << D eta^2.
    e2 = float(eta) ** 2
    a, b, c = D + 2.0, M - D * e2, M * e2
    root = torch.sqrt(b * b + 4.0 * a * c)
    plus = (b + root) / (2.0 * a)
    rational = 2.0 * c / (root - b).clamp_min(torch.finfo(M.dtype).tiny)
    return torch.where(b >= 0, plus, rational)


def kl_multiplier_at(epoch: int, kl_multiplier: float, no_kl_epochs: float, warmup_epochs: float) -> float:
    """(3): kl_multiplier * clamp((epoch - no_kl_epochs) / warmup_epochs, 0, 1); warmup 0 is a step."""
    if warmup_epochs <= 0:
        return kl_multiplier if epoch > no_kl_epochs else 0.0
    return kl_multiplier * min(max((epoch - no_kl_epochs) / warmup_epochs, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------------


class BayesTensorLinear(RankAdaptiveLayer):
    """A tensorized Linear (``inner``: a ``CPLinear`` / ``TuckerLinear`` / ``TTLinear`` / ``TTMLinear``, whose
    contraction forward is used unchanged) with one prior variance per rank component (buffers ``scale2_j``), the
    EM update on every training forward, and permanent masks (buffers ``mask_j``) for pruned components."""

    def __init__(self, inner: tf.TensorLinear, factorization: TensorFactorization, shape: tuple[int, int], *,
                 prior: str = "log_uniform", eta: float = 1.0, em_stepsize: float = 1.0, threshold: float = 1e-5,
                 relative_threshold: float = 0.0):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.inner = inner
        self.format = inner.format_name
        self.factorization = factorization
        self.shape = (int(shape[0]), int(shape[1]))
        self.prior, self.eta, self.em_stepsize, self.threshold = prior, float(eta), float(em_stepsize), threshold
        self.relative_threshold = float(relative_threshold)
        if self.format == "cp":  # lambda fixed at 1: all scale lives in the factors, under the prior
            weights = inner.weights.detach().clone()
            del inner.weights
            inner.register_buffer("weights", torch.ones_like(weights))
        self.counts = self._counts()
        with torch.no_grad():
            sums = self._sums()
        for j, (M, D) in enumerate(zip(sums, self.counts)):
            self.register_buffer(f"scale2_{j}", em_update(M, D, prior, eta))
            self.register_buffer(f"mask_{j}", torch.ones(M.shape, dtype=torch.bool, device=M.device))
        self._pruned = False

    # -- the groups of (1) -----------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return len(self.counts)

    def scale2(self, j: int) -> torch.Tensor:
        return getattr(self, f"scale2_{j}")

    def mask(self, j: int) -> torch.Tensor:
        return getattr(self, f"mask_{j}")

    def _counts(self) -> list[int]:
        inner = self.inner
        if self.format == "cp":
            return [sum(int(A.shape[0]) for A in inner.factors)]
        if self.format == "tucker":
            return [int(U.shape[0]) for U in inner.factors]
        cores = list(inner.cores)
        counts = [math.prod(G.shape[:-1]) for G in cores[:-1]]
        counts[-1] += math.prod(cores[-1].shape[1:])
        return counts

    def _sums(self) -> list[torch.Tensor]:
        """M_r of every slot (differentiable in the factors)."""
        inner = self.inner
        if self.format == "cp":
            return [sum(A.square().sum(dim=0) for A in inner.factors)]
        if self.format == "tucker":
            return [U.square().sum(dim=0) for U in inner.factors]
        cores = list(inner.cores)
        sums = [G.square().sum(dim=tuple(range(G.ndim - 1))) for G in cores[:-1]]
        sums[-1] = sums[-1] + cores[-1].square().sum(dim=tuple(range(1, cores[-1].ndim)))
        return sums

    # -- EM, prior, pruning ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def em_step(self) -> None:
        """(4)-(6) for every slot at the current factors."""
        for j, (M, D) in enumerate(zip(self._sums(), self.counts)):
            update = em_update(M, D, self.prior, self.eta)
            s2 = self.scale2(j)
            s2.copy_(update if self.em_stepsize == 1.0 else (1.0 - self.em_stepsize) * s2 + self.em_stepsize * update)

    def neg_log_prior(self) -> torch.Tensor:
        """-log N(factors | 0, s^2) summed over the unpruned components: the bracket of (2)."""
        total = None
        for j, (M, D) in enumerate(zip(self._sums(), self.counts)):
            s2 = self.scale2(j).clamp_min(torch.finfo(M.dtype).tiny)
            term = torch.where(self.mask(j), M / s2 + D * torch.log(2.0 * math.pi * s2), torch.zeros_like(M))
            term = 0.5 * term.sum()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def survivors(self) -> list[torch.Tensor]:
        """Per slot, the unpruned components with s^2 > threshold and s^2 > relative_threshold x the slot's largest
        unpruned s^2 (at least the largest one)."""
        out = []
        for j in range(self.slots):
            s2, mask = self.scale2(j), self.mask(j)
            alive = mask & (s2 > self.threshold)
            if self.relative_threshold > 0.0 and bool(mask.any()):
                alive = alive & (s2 > self.relative_threshold * s2[mask].max())
            if not bool(alive.any()):
                alive = torch.zeros_like(mask)
                alive[int(torch.where(mask, s2, torch.full_like(s2, -math.inf)).argmax())] = True
            out.append(alive)
        return out

    @torch.no_grad()
    def prune(self) -> None:
        """Mask the components at or below the threshold for good and zero their slices."""
        for j, alive in enumerate(self.survivors()):
            self.mask(j).copy_(alive)
        self._pruned = any(not bool(self.mask(j).all()) for j in range(self.slots))
        self.enforce_masks()

    @torch.no_grad()
    def enforce_masks(self) -> None:
        """Zero the slices of the pruned components (after every optimiser step: they stay zero)."""
        if not self._pruned:
            return
        inner = self.inner
        if self.format == "cp":
            keep = self.mask(0).to(inner.factors[0].dtype)
            for A in inner.factors:
                A.mul_(keep)
        elif self.format == "tucker":
            core = inner.core
            for k, U in enumerate(inner.factors):
                keep = self.mask(k).to(U.dtype)
                U.mul_(keep)
                shape = [1] * core.ndim
                shape[k] = -1
                core.mul_(keep.reshape(shape))
        else:
            cores = inner.cores
            for j in range(self.slots):
                keep = self.mask(j).to(cores[j].dtype)
                cores[j].mul_(keep)  # last axis
                cores[j + 1].mul_(keep.reshape([-1] + [1] * (cores[j + 1].ndim - 1)))  # first axis

    @torch.no_grad()
    def balance(self) -> None:
        """``tt`` / ``ttm`` only: per bond component r, rescale G_k[..., r] by c_r and G_{k+1}[r, ...] by 1 / c_r so
        that both slices have the same RMS entry (W is unchanged). No-op for ``cp`` and ``tucker``."""
        if self.format not in ("tt", "ttm"):
            return
        cores, tiny = self.inner.cores, torch.finfo(self.inner.cores[0].dtype).tiny
        for j in range(self.slots):
            left_core, right_core = cores[j], cores[j + 1]
            left = left_core.square().mean(dim=tuple(range(left_core.ndim - 1))).sqrt()
            right = right_core.square().mean(dim=tuple(range(1, right_core.ndim))).sqrt()
            ok = (left > tiny) & (right > tiny)
            c = torch.where(ok, (right.clamp_min(tiny) / left.clamp_min(tiny)).sqrt(), torch.ones_like(left))
            left_core.mul_(c)
            right_core.div_(c.reshape([-1] + [1] * (right_core.ndim - 1)))
            self._rescaled_bond(j, c)

    def _rescaled_bond(self, j: int, c: torch.Tensor) -> None:
        """Called by ``balance`` after bond j's slices were scaled by c (left) and 1 / c (right)."""

    # -- RankAdaptiveLayer ---------------------------------------------------------------------------------------------
    def _surviving_counts(self) -> tuple[int, ...]:
        return tuple(int(alive.sum()) for alive in self.survivors())

    def ranks(self) -> int | tuple[int, ...]:
        counts = self._surviving_counts()
        if self.format == "cp":
            return counts[0]
        return tuple(int(r) for r in self.factorization.feasible(self.shape, counts))

    def stored_params(self) -> int:
        return int(self.factorization.params_at_ranks(self.shape, self._surviving_counts()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.em_step()  # the reference updates s^2 before computing the output
        return self.inner(x)

    def start_params(self) -> int:
        """Parameters stored at the allocated (max) ranks: the format's size before rank determination."""
        return int(self.factorization.params_at_ranks(self.shape, tuple(int(self.mask(j).numel())
                                                                        for j in range(self.slots))))

    def extra_repr(self) -> str:
        return f"format={self.format}, prior={self.prior}, ranks={self.ranks()}"


def _along(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A vector v laid along ``axis`` of an ``ndim``-way tensor (for broadcasting)."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class VariationalTensorLinear(BayesTensorLinear):
    """``inference = svi``: the layer of ``BayesTensorLinear`` with a mean-field Gaussian posterior over every entry x
    of a prior-carrying factor, q(x) = N(mu_x, sigma_x^2). The means mu are the inner layer's own parameters (so the
    eval-mode forward is the network at the posterior mean of the factors), sigma = softplus(rho) with ``rho`` in
    ``posterior_rho`` (one tensor per prior-carrying factor). During the Pyro model the forward uses the drawn factors
    (``_draws``) instead. Entries of pruned components are masked out of the model, the guide and the sums."""

    def __init__(self, inner: tf.TensorLinear, factorization: TensorFactorization, shape: tuple[int, int], *,
                 posterior_scale: float = 1e-2, **kwargs):
        super().__init__(inner, factorization, shape, **kwargs)
        rhos = []
        for _, mu, _, _ in self.prior_tensors():
            rms = float(mu.detach().square().mean().sqrt())
            sigma0 = max(float(posterior_scale) * rms, 1e-12)
            rhos.append(nn.Parameter(torch.full_like(mu.detach(), _inverse_softplus(sigma0))))
        self.posterior_rho = nn.ParameterList(rhos)
        self._draws: dict[str, torch.Tensor] | None = None
        with torch.no_grad():  # s^2 at the initial posterior (undamped)
            for j, (M, D) in enumerate(self.variational_sums()):
                self.scale2(j).copy_(em_update(M, D, self.prior, self.eta))

    # -- the posterior ---------------------------------------------------------------------------------------------
    def prior_tensors(self) -> list[tuple[str, nn.Parameter, int, int]]:
        """(name in ``inner``, the factor, its slot, the axis of the slot's components) of every factor under the
        prior (1): CP all factors (slot 0, columns), Tucker U_k (slot k, columns; the core is a point estimate),
        TT / TTM core k < N (bond k, last axis) and the last core (the last bond, first axis)."""
        inner = self.inner
        if self.format == "cp":
            return [(f"factors.{k}", A, 0, -1) for k, A in enumerate(inner.factors)]
        if self.format == "tucker":
            return [(f"factors.{k}", U, k, -1) for k, U in enumerate(inner.factors)]
        cores = list(inner.cores)
        last = len(cores) - 1
        inner_cores = [(f"cores.{k}", G, k, -1) for k, G in enumerate(cores[:-1])]
        return inner_cores + [(f"cores.{last}", cores[-1], last - 1, 0)]

    def live(self, k: int) -> torch.Tensor:
        """Boolean mask of the entries of prior tensor k that no pruned component has zeroed."""
        _, mu, slot, axis = self.prior_tensors()[k]
        alive = _along(self.mask(slot), mu.ndim, axis)
        if self.format in ("tt", "ttm") and 0 < k < self.slots:  # a middle core's left bond masks its first axis
            alive = alive & _along(self.mask(k - 1), mu.ndim, 0)
        return alive.expand(mu.shape)

    def posterior_std(self, k: int) -> torch.Tensor:
        rho = self.posterior_rho[k]
        return nn.functional.softplus(rho).clamp_min(torch.finfo(rho.dtype).tiny)

    def variational_sums(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per slot, (M_r, D_r) = (sum of E_q[x^2] = mu^2 + sigma^2, number) over the live entries of group r."""
        sums: list[list[torch.Tensor] | None] = [None] * self.slots
        for k, (_, mu, slot, axis) in enumerate(self.prior_tensors()):
            live = self.live(k)
            second = torch.where(live, mu.square() + self.posterior_std(k).square(), torch.zeros_like(mu))
            dims = tuple(d for d in range(mu.ndim) if d != axis % mu.ndim)
            M, D = second.sum(dim=dims), live.to(mu.dtype).sum(dim=dims)
            sums[slot] = [M, D] if sums[slot] is None else [sums[slot][0] + M, sums[slot][1] + D]
        return [(M, D) for M, D in sums]

    @torch.no_grad()
    def em_step(self) -> None:
        """The variational EM update: (4) / (5) with M_r = sum E_q[x^2] and D_r the live entries of group r -- the
        exact maximiser of the ELBO (8) over s_r^2 at the current q -- damped by (6)."""
        for j, (M, D) in enumerate(self.variational_sums()):
            update = torch.where(self.mask(j), em_update(M, D, self.prior, self.eta), torch.zeros_like(M))
            s2 = self.scale2(j)
            s2.copy_(update if self.em_stepsize == 1.0 else (1.0 - self.em_stepsize) * s2 + self.em_stepsize * update)

    def _prior_scale(self, k: int, live: torch.Tensor) -> torch.Tensor:
        _, mu, slot, axis = self.prior_tensors()[k]
        s2 = _along(self.scale2(slot), mu.ndim, axis).expand(mu.shape)
        return torch.where(live, s2, torch.ones_like(s2)).clamp_min(torch.finfo(mu.dtype).tiny).sqrt()

    def kl_divergence(self) -> torch.Tensor:
        """KL(q || p(. | s)) over the live entries, in closed form (differentiable in mu and rho)."""
        total = None
        for k, (_, mu, _, _) in enumerate(self.prior_tensors()):
            live = self.live(k)
            s = self._prior_scale(k, live)
            sigma = self.posterior_std(k)
            kl = 0.5 * ((sigma.square() + mu.square()) / s.square() - 1.0) - torch.log(sigma / s)
            term = torch.where(live, kl, torch.zeros_like(kl)).sum()
            total = term if total is None else total + term
        return total

    def log_hyperprior(self) -> torch.Tensor:
        """sum over unpruned components of log p(s_r) (up to a constant): -log s_r (log-uniform) or
        -log(1 + s_r^2 / eta^2) (half-Cauchy)."""
        total = None
        for j in range(self.slots):
            s2 = self.scale2(j).clamp_min(torch.finfo(self.scale2(j).dtype).tiny)
            term = -0.5 * torch.log(s2) if self.prior == "log_uniform" else -torch.log1p(s2 / self.eta**2)
            term = torch.where(self.mask(j), term, torch.zeros_like(term)).sum()
            total = term if total is None else total + term
        return total

    # -- the Pyro sites ----------------------------------------------------------------------------------------------
    def sample_prior(self, prefix: str) -> None:
        """Model side: x ~ N(0, s_r^2) for every live entry (one ``pyro.sample`` per factor, masked), and the
        hyper-prior log p(s) as a ``pyro.factor``. The (masked) draws become the factors of this layer's next
        forwards."""
        draws = {}
        for k, (name, mu, _, _) in enumerate(self.prior_tensors()):
            live = self.live(k)
            prior = dist.Normal(torch.zeros_like(mu), self._prior_scale(k, live)).mask(live).to_event(mu.ndim)
            x = pyro.sample(prefix + name, prior)
            draws[name] = torch.where(live, x, torch.zeros_like(x))
        pyro.factor(prefix + "log_hyperprior", self.log_hyperprior())
        self._draws = draws

    def sample_posterior(self, prefix: str) -> None:
        """Guide side: x ~ q = N(mu, softplus(rho)^2) (reparameterised), masked like the model."""
        for k, (name, mu, _, _) in enumerate(self.prior_tensors()):
            q = dist.Normal(mu, self.posterior_std(k)).mask(self.live(k)).to_event(mu.ndim)
            pyro.sample(prefix + name, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._draws is None:
            return self.inner(x)  # the posterior mean (no EM here: the SVI loop runs it before every step)
        # The drawn factors replace the whole factor list of the format's layer for this call, so its own contraction
        # runs on them. They go into the instance __dict__ (found before the ParameterList in ``_modules``) as a plain
        # list: the format's forward slices its list, and a sliced ParameterList would re-wrap the draws as leaf
        # Parameters, cutting the reparameterisation gradient (torch.func.functional_call has that problem here).
        key = "factors" if self.format in ("cp", "tucker") else "cores"
        count = len(getattr(self.inner, key))
        self.inner.__dict__[key] = [self._draws[f"{key}.{k}"] for k in range(count)]
        try:
            return self.inner(x)
        finally:
            del self.inner.__dict__[key]

    def _rescaled_bond(self, j: int, c: torch.Tensor) -> None:
        """``balance``: the posterior std of the rescaled slices follows their means (q's shape is kept)."""
        tiny = torch.finfo(c.dtype).tiny
        for k, factor in ((j, c.reshape([1] * (self.posterior_rho[j].ndim - 1) + [-1])),
                          (j + 1, (1.0 / c).reshape([-1] + [1] * (self.posterior_rho[j + 1].ndim - 1)))):
            sigma = (self.posterior_std(k) * factor).clamp_min(tiny)
            self.posterior_rho[k].copy_(sigma + torch.log(-torch.expm1(-sigma)))


# ---------------------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------------------


def max_ranks(factorization: TensorFactorization, shape: tuple[int, int], max_rank: int) -> tuple[int, ...]:
    """``max_rank`` in every slot of the format, clipped to its feasible set."""
    out_dims, in_dims = factorization.dims(shape)
    fmt = factorization.name
    if fmt == "cp":
        slots = 1
    elif fmt == "tucker":
        slots = len(out_dims) + len(in_dims)
    elif fmt == "tt":
        slots = len(out_dims) + len(in_dims) - 1
    elif fmt == "ttm":
        slots = len(out_dims) - 1
    else:
        raise ValueError(f"bayes-tensor has no layer for format {fmt!r}")
    if slots == 0:
        raise ValueError(f"{fmt} with order_out = order_in = 1 has no rank to learn")
    return tuple(int(r) for r in factorization.feasible(shape, (int(max_rank),) * slots))


def _truncated(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    t = torch.empty(tuple(int(s) for s in shape), dtype=torch.float64)
    return torch.nn.init.trunc_normal_(t, 0.0, std, -_TRUNCATE * std, _TRUNCATE * std, generator=generator)


def random_layer(fmt: str, out_dims, in_dims, ranks: tuple[int, ...], target: float, generator: torch.Generator,
                 bias: torch.Tensor | None = None) -> tf.TensorLinear:
    """The reference's "nn" init in float64: factors with std sigma such that a weight entry has std ``target``."""
    dims = (*out_dims, *in_dims)
    N = len(dims)
    if fmt == "cp":
        R = ranks[0]
        sigma = (target / math.sqrt(R)) ** (1.0 / N)
        factors = [_truncated((d, R), sigma, generator) for d in dims]
        return tf.CPLinear(factors, torch.ones(R, dtype=torch.float64), out_dims, in_dims, bias)
    if fmt == "tucker":
        sigma = (target**2 / math.prod(ranks)) ** (1.0 / (2 * (N + 1)))
        core = _truncated(ranks, sigma, generator)
        factors = [_truncated((d, r), sigma, generator) for d, r in zip(dims, ranks)]
        return tf.TuckerLinear(core, factors, out_dims, in_dims, bias)
    if fmt in ("tt", "ttm"):
        modes = list(dims) if fmt == "tt" else [(o, i) for o, i in zip(out_dims, in_dims)]
        r = (1, *ranks, 1)
        sigma = (target**2 / math.prod(ranks)) ** (1.0 / (2 * len(modes)))
        cores = []
        for k, mode in enumerate(modes):
            middle = (mode,) if fmt == "tt" else mode
            cores.append(_truncated((r[k], *middle, r[k + 1]), sigma, generator))
        cls = tf.TTLinear if fmt == "tt" else tf.TTMLinear
        return cls(cores, out_dims, in_dims, bias)
    raise ValueError(f"bayes-tensor has no layer for format {fmt!r}")


def build_layer(factorization: TensorFactorization, linear: nn.Linear, *, max_rank: int = 20, init: str = "site",
                prior: str = "log_uniform", eta: float = 1.0, em_stepsize: float = 1.0, threshold: float = 1e-5,
                seed: int = 0, posterior_scale: float | None = None, relative_threshold: float = 0.0
                ) -> BayesTensorLinear:
    """A site's Bayesian tensorized replacement at the (clipped) max ranks, on the site's device and dtype; with
    ``posterior_scale`` (svi) a ``VariationalTensorLinear`` whose posterior std starts at that fraction of each
    factor's RMS entry."""
    weight = linear.weight.detach()
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    out_dims, in_dims = factorization.dims(shape)
    ranks = max_ranks(factorization, shape, max_rank)
    bias = None if linear.bias is None else linear.bias.detach().to(torch.float64).cpu()
    if init == "fit":
        inner = factorization.fit(weight.to(torch.float64), None, ranks)
        if factorization.name == "cp":  # fold lambda (>= 0) into the factors: lambda is fixed at 1 in training
            share = inner.weights.detach().clamp_min(0.0) ** (1.0 / len(inner.factors))
            factors = [A.detach() * share for A in inner.factors]
            inner = tf.CPLinear(factors, torch.ones_like(share), out_dims, in_dims)
        if bias is not None:
            inner.bias = nn.Parameter(bias.to(device=weight.device))
    elif init in ("site", "kaiming"):
        target = float(weight.to(torch.float64).std()) if init == "site" and weight.numel() > 1 else 0.0
        if not target > 0.0:
            target = math.sqrt(2.0 / shape[1])
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        inner = random_layer(factorization.name, out_dims, in_dims, ranks, target, generator, bias)
    else:
        raise ValueError(f"init must be 'site', 'kaiming' or 'fit', got {init!r}")
    inner = inner.to(device=weight.device, dtype=weight.dtype)
    if posterior_scale is not None:
        return VariationalTensorLinear(inner, factorization, shape, posterior_scale=posterior_scale, prior=prior,
                                       eta=eta, em_stepsize=em_stepsize, threshold=threshold,
                                       relative_threshold=relative_threshold)
    return BayesTensorLinear(inner, factorization, shape, prior=prior, eta=eta, em_stepsize=em_stepsize,
                             threshold=threshold, relative_threshold=relative_threshold)


# ---------------------------------------------------------------------------------------------------------------------
# Stochastic variational inference (Pyro)
# ---------------------------------------------------------------------------------------------------------------------


def count_examples(batches) -> int:
    """Examples in one epoch's minibatches: the leading dimension of each batch (a tensor), of its first element (a
    tuple / list, e.g. (x, y)) or of its first value (a dict). Raises for batches of another kind."""
    total = 0
    for batch in batches:
        lead = batch
        if isinstance(lead, (tuple, list)) and lead:
            lead = lead[0]
        elif isinstance(lead, dict) and lead:
            lead = next(iter(lead.values()))
        if not isinstance(lead, torch.Tensor) or lead.ndim == 0:
            raise ValueError(f"cannot count the examples of a {type(batch).__name__} batch: set data_size")
        total += int(lead.shape[0])
    if total == 0:
        raise ValueError("the epoch has no examples: set data_size")
    return total


class TensorizedSVI:
    """The Pyro model and guide of (7)-(8) for a network whose sites are ``VariationalTensorLinear`` layers.

    model(batch, beta): per layer, the factors' prior and the hyper-prior (scaled by beta, the KL warm-up; masked out
    at beta = 0), then ``pyro.factor("log_likelihood", -N * run.loss(batch))``. guide(batch, beta): per layer, the
    mean-field Gaussian q. ``loss`` returns Pyro's estimate of -ELBO_beta / N for one minibatch (differentiable in
    the variational parameters and in the network's other parameters) and the task loss at the drawn factors."""

    def __init__(self, run: TrainingRun, layers: dict[str, VariationalTensorLinear], data_size: int,
                 estimator: str = "mean_field"):
        self.run, self.layers, self.data_size = run, layers, int(data_size)
        if estimator not in ("mean_field", "trace"):
            raise ValueError(f"estimator must be 'mean_field' or 'trace', got {estimator!r}")
        # max_plate_nesting = 0: no plates, and Pyro need not run model and guide once more to find out
        self.elbo = (TraceMeanField_ELBO if estimator == "mean_field" else Trace_ELBO)(max_plate_nesting=0)
        self.last_task_loss: torch.Tensor | None = None

    @staticmethod
    def _prior_weight(beta: float):
        return pyro.poutine.scale(scale=float(beta)) if beta > 0.0 else pyro.poutine.mask(mask=False)

    def model(self, batch, beta: float = 1.0) -> None:
        try:
            with self._prior_weight(beta):
                for name, layer in self.layers.items():
                    layer.sample_prior(f"{name}/")
            task_loss = self.run.loss(batch)  # the sites' forwards use the drawn factors
            self.last_task_loss = task_loss.detach()
            pyro.factor("log_likelihood", -self.data_size * task_loss)
        finally:
            for layer in self.layers.values():
                layer._draws = None

    def guide(self, batch, beta: float = 1.0) -> None:
        with self._prior_weight(beta):
            for name, layer in self.layers.items():
                layer.sample_posterior(f"{name}/")

    def loss(self, batch, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(-ELBO_beta / N estimated on ``batch`` with one draw from q, the task loss at that draw)."""
        negative_elbo = self.elbo.differentiable_loss(self.model, self.guide, batch, beta)
        return negative_elbo / self.data_size, self.last_task_loss

    def prior_terms(self) -> torch.Tensor:
        """KL(q || p(. | s)) - log p(s) over all layers, in closed form: the ELBO's non-data part (negated)."""
        return sum(layer.kl_divergence() - layer.log_hyperprior() for layer in self.layers.values())


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class BayesTensorTrainer(RankAdaptiveTrainer):
    name = "bayes-tensor"
    version = "2"
    description = ("Bayesian tensorized layers (CP/Tucker/TT/TTM) with per-component ARD priors: MAP training with "
                   "closed-form EM scale updates and a warmed-up prior (inference=map), or the paper's variational "
                   "posterior by SVI with Pyro (inference=svi); components below a threshold are pruned.")
    formats: ClassVar[frozenset[str]] = frozenset({"cp", "tucker", "tt", "ttm"})

    class Params(PluginParams):
        kl_multiplier: float = Field(5e-5, ge=0.0, description=(
            "weight of the prior term (summed over factor entries) against the batch-mean task loss; the MNIST "
            "script's TT/CP value. 0 trains without the prior (nothing is pruned)"))
        max_rank: int = Field(20, ge=1, description="rank allocated in every slot, clipped to the feasible ranks")
        prior: Literal["log_uniform", "half_cauchy"] = Field(
            "log_uniform", description="hyper-prior on each component's scale s: p(s) ~ 1/s or half-Cauchy(eta)")
        eta: float = Field(1.0, gt=0.0, description="half-Cauchy scale (prior = half_cauchy only)")
        no_kl_fraction: float = Field(0.05, ge=0.0, description=(
            "epochs without the prior term, as a fraction of the epoch budget (MNIST script: 5 of 100)"))
        warmup_fraction: float = Field(0.5, ge=0.0, description=(
            "epochs of linear KL warm-up after those, as a fraction of the epoch budget (MNIST script: 50 of 100)"))
        no_kl_epochs: float | None = Field(None, ge=0.0, description="absolute no-KL epochs (overrides the fraction)")
        warmup_epochs: float | None = Field(None, ge=0.0, description="absolute warm-up epochs (overrides the fraction)")
        em_stepsize: float = Field(1.0, gt=0.0, le=1.0, description="damping of the EM update of s^2 (1: undamped)")
        threshold: float = Field(1e-5, gt=0.0, description="a component survives while its s^2 exceeds this")
        relative_threshold: float | None = Field(None, ge=0.0, lt=1.0, description=(
            "a component also needs s^2 > this x its slot's largest s^2 (None: 0 for map, the reference's absolute "
            "rule; 0.05 for svi, whose idle components' s^2 stall ~100x below the needed ones' but far above the "
            "absolute threshold)"))
        prune: Literal["epoch", "end"] = Field("epoch", description=(
            "epoch: mask components below the threshold permanently after every epoch (monotone ranks); end: only "
            "after training, as the MNIST script's live rank estimates"))
        init: Literal["site", "kaiming", "fit"] = Field("site", description=(
            "site / kaiming: random factors whose product has the std of the site's initial weight / sqrt(2/in) "
            "(the reference); fit: the format's fit of the site's initial weight at the max ranks"))
        balance: bool = Field(False, description=(
            "tt/ttm: rebalance the two core slices of every bond component to equal RMS after each epoch (W "
            "unchanged), against the MAP objective's scale drift between cores; not in the reference"))
        lr: float | None = Field(None, gt=0.0, description="learning rate (None: the task's)")
        inference: Literal["map", "svi"] = Field("map", description=(
            "map: point estimate of the factors with the prior term weighted by kl_multiplier (the reference code); "
            "svi: mean-field Gaussian posterior over the factors fitted by Pyro's SVI on the ELBO with the data term "
            "N x the task loss (arXiv 2010.08689)"))
        data_size: int | None = Field(None, ge=1, description=(
            "svi: N, the examples the task loss averages over per epoch (None: counted from the first epoch's "
            "batches; needed for batches that are not tensors or (x, y) tuples)"))
        posterior_scale: float = Field(1e-2, gt=0.0, description=(
            "svi: initial posterior std of every factor entry, as a fraction of that factor's initial RMS entry"))
        kl_weight: float = Field(1.0, gt=0.0, description=(
            "svi: weight of the KL and hyper-prior terms after the warm-up; 1 is the ELBO, > 1 a tempered posterior "
            "(the reference's MNIST kl_multiplier 5e-5 x 60,000 images = 3)"))
        estimator: Literal["mean_field", "trace"] = Field("mean_field", description=(
            "svi: Pyro's TraceMeanField_ELBO (closed-form KL of the Gaussian factors) or Trace_ELBO (Monte Carlo "
            "KL); the same ELBO"))

        @model_validator(mode="after")
        def _kl_multiplier_is_map_only(self):
            if self.inference == "svi" and "kl_multiplier" in self.model_fields_set:
                raise ValueError("kl_multiplier weights the MAP prior term; svi weights the KL by the ELBO's 1 / N "
                                 "(set data_size to change N)")
            return self

    @property
    def relative_threshold(self) -> float:
        p = self.params
        if p.relative_threshold is not None:
            return float(p.relative_threshold)
        return 5e-2 if p.inference == "svi" else 0.0

    def schedule(self, epochs: int) -> tuple[float, float]:
        """(no_kl_epochs, warmup_epochs) for a budget of ``epochs``."""
        p = self.params
        no_kl = p.no_kl_epochs if p.no_kl_epochs is not None else p.no_kl_fraction * epochs
        warmup = p.warmup_epochs if p.warmup_epochs is not None else p.warmup_fraction * epochs
        return float(no_kl), float(warmup)

    def train(self, run: TrainingRun) -> None:
        p = self.params
        factorization = run.factorization
        if not isinstance(factorization, TensorFactorization) or factorization.name not in self.formats:
            raise TypeError(f"bayes-tensor trains {sorted(self.formats)} layers, got {factorization!r}")
        layers: list[BayesTensorLinear] = []
        base_seed = int(getattr(run.ctx, "seed", 0))
        posterior_scale = p.posterior_scale if p.inference == "svi" else None
        for index, (name, linear) in enumerate(run.sites.items()):
            layer = build_layer(factorization, linear, max_rank=p.max_rank, init=p.init, prior=p.prior, eta=p.eta,
                                em_stepsize=p.em_stepsize, threshold=p.threshold,
                                seed=base_seed * 1_000_003 + 7919 * index, posterior_scale=posterior_scale,
                                relative_threshold=self.relative_threshold)
            run.replace(name, layer)
            layers.append(layer)
        if p.inference == "svi":
            self._train_svi(run, layers)
        else:
            self._train_map(run, layers)
        self._record_compression(run, layers)

    @staticmethod
    def _record_compression(run: TrainingRun, layers: list[BayesTensorLinear]) -> None:
        """start_params (stored at the allocated max ranks), start_param_ratio (that over dense) and
        param_ratio_vs_start (stored at the final ranks over start_params): param_ratio = start_param_ratio x
        param_ratio_vs_start, the format's share and rank determination's share of the compression."""
        start = sum(layer.start_params() for layer in layers)
        final = sum(layer.stored_params() for layer in layers)
        run.ctx.metric("start_params", start)
        run.ctx.metric("start_param_ratio", start / run.dense_params)
        run.ctx.metric("param_ratio_vs_start", final / start)

    def _train_map(self, run: TrainingRun, layers: list[BayesTensorLinear]) -> None:
        p = self.params
        optimizer = run.optimizer(run.model.parameters(), p.lr)
        no_kl, warmup = self.schedule(run.settings.epochs)
        for epoch, batches in run.epochs():
            mult = kl_multiplier_at(epoch, p.kl_multiplier, no_kl, warmup)
            task_losses, finite = [], True
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                task_loss = run.loss(batch)  # the layers' forwards run the EM update
                loss = task_loss
                if mult > 0.0:
                    loss = task_loss + mult * sum(layer.neg_log_prior() for layer in layers)
                loss.backward()
                optimizer.step()
                for layer in layers:
                    layer.enforce_masks()
                task_losses.append(task_loss.item())
                if mult > 0.0 and not math.isfinite(loss.item()):
                    finite = False
            if p.balance:
                for layer in layers:
                    layer.balance()
                    layer.em_step()  # s^2 at the rebalanced cores, so the pruning below sees them
            if p.prune == "epoch":
                for layer in layers:
                    layer.prune()
            mean = sum(task_losses) / max(len(task_losses), 1)
            run.end_epoch(epoch, mean if finite else math.nan)
        for layer in layers:  # evaluation: the pruned components zeroed
            layer.prune()

    def _train_svi(self, run: TrainingRun, layers: list[VariationalTensorLinear]) -> None:
        p = self.params
        N = p.data_size if p.data_size is not None else count_examples(run.task.training_batches(run.ctx, 1))
        if hasattr(run.ctx, "note"):
            run.ctx.note("data_size", str(N))  # the N of the ELBO's data term (7)
        svi = TensorizedSVI(run, dict(run.layers), N, p.estimator)
        rhos = [rho for layer in layers for rho in layer.posterior_rho]
        rho_ids = {id(rho) for rho in rhos}
        optimizer = run.optimizer([q for q in run.model.parameters() if id(q) not in rho_ids], p.lr)
        optimizer.add_param_group({"params": rhos, "weight_decay": 0.0})  # no decay of the posterior's spread
        no_kl, warmup = self.schedule(run.settings.epochs)
        for epoch, batches in run.epochs():
            beta = kl_multiplier_at(epoch, p.kl_weight, no_kl, warmup)
            task_losses, elbos, finite = [], [], True
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                for layer in layers:
                    layer.em_step()  # s^2 <- argmax of the ELBO at the current q
                objective, task_loss = svi.loss(batch, beta)
                with torch.no_grad():  # the per-example ELBO at beta = 1, at the parameters of this draw
                    elbos.append(-task_loss.item() - float(svi.prior_terms()) / N)
                objective.backward()
                optimizer.step()
                for layer in layers:
                    layer.enforce_masks()
                task_losses.append(task_loss.item())
                if not math.isfinite(objective.item()):
                    finite = False
            if p.balance:
                for layer in layers:
                    layer.balance()
                    layer.em_step()
            if p.prune == "epoch":
                for layer in layers:
                    layer.prune()
            run.curves.setdefault("elbo", []).append((epoch, sum(elbos) / max(len(elbos), 1)))
            mean = sum(task_losses) / max(len(task_losses), 1)
            run.end_epoch(epoch, mean if finite else math.nan)
        for layer in layers:  # evaluation: the posterior mean of the factors, the pruned components zeroed
            layer.em_step()
            layer.prune()


@hookimpl
def rankbench_register_selectors(register):
    register(BayesTensorTrainer)
