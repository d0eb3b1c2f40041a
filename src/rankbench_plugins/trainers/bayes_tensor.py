"""``bayes-tensor``: tensorized layers whose ranks are learned by automatic relevance determination (ARD) while the
network trains -- Hawkins & Zhang, "Bayesian Tensorized Neural Networks with Automatic Rank Selection" (arXiv
1905.10478, Neurocomputing 2021) and Hawkins, Liu & Zhang, "Towards Compact Neural Networks via End-to-End Training: A
Bayesian Tensor Approach with Automatic Rank Determination" (arXiv 2010.08689, SIAM J. Math. Data Sci. 2022);
``docs/algorithms.md#bayesian-tensorized-networks``. Reference code: colehawkins/bayesian-tensor-rank-determination
(``tensor_layers`` and the MNIST script), whose semantics are followed where they differ from the papers (noted below).

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

Training (MAP, as the reference code does it)
---------------------------------------------
The papers fit a variational posterior (SVI; Stein variational GD in 1905.10478). The reference code -- and this
plugin -- computes a MAP point estimate: q(factors) is a point mass (the reference keeps a Gaussian with a fixed
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
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
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
                 prior: str = "log_uniform", eta: float = 1.0, em_stepsize: float = 1.0, threshold: float = 1e-5):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.inner = inner
        self.format = inner.format_name
        self.factorization = factorization
        self.shape = (int(shape[0]), int(shape[1]))
        self.prior, self.eta, self.em_stepsize, self.threshold = prior, float(eta), float(em_stepsize), threshold
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
        """Per slot, the unpruned components with s^2 > threshold (at least the largest one)."""
        out = []
        for j in range(self.slots):
            s2, mask = self.scale2(j), self.mask(j)
            alive = mask & (s2 > self.threshold)
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

    def extra_repr(self) -> str:
        return f"format={self.format}, prior={self.prior}, ranks={self.ranks()}"


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
                seed: int = 0) -> BayesTensorLinear:
    """A site's Bayesian tensorized replacement at the (clipped) max ranks, on the site's device and dtype."""
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
    return BayesTensorLinear(inner, factorization, shape, prior=prior, eta=eta, em_stepsize=em_stepsize,
                             threshold=threshold)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class BayesTensorTrainer(RankAdaptiveTrainer):
    name = "bayes-tensor"
    version = "1"
    description = ("Bayesian tensorized layers (CP/Tucker/TT/TTM) with per-component ARD priors: MAP training with "
                   "closed-form EM scale updates and a warmed-up prior; components below a threshold are pruned.")
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
        for index, (name, linear) in enumerate(run.sites.items()):
            layer = build_layer(factorization, linear, max_rank=p.max_rank, init=p.init, prior=p.prior, eta=p.eta,
                                em_stepsize=p.em_stepsize, threshold=p.threshold,
                                seed=base_seed * 1_000_003 + 7919 * index)
            run.replace(name, layer)
            layers.append(layer)
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


@hookimpl
def rankbench_register_selectors(register):
    register(BayesTensorTrainer)
