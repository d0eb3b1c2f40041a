"""The layers and the Pyro model of ``bayes-tensor`` (the method, its equations and the reference's choices: the
docstring of ``bayes_tensor``): ``BayesTensorLinear`` (a tensorized Linear with per-component ARD variances and the EM
update (4)-(6)), ``VariationalTensorLinear`` (its mean-field Gaussian posterior, inference = svi), ``em_update``, the
random init (``random_layer``), ``build_layer`` (a site's replacement) and ``TensorizedSVI`` (the Pyro model and
guide of (7)-(8)). Imported when a run builds its layers (torch; Pyro for svi).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from rankbench.kinds import tensor_formats as tf
from rankbench.kinds.tensor_compression import TensorFactorization
from rankbench.kinds.training import RankAdaptiveLayer, TrainingRun

_TRUNCATE = 3.0  # the random init's truncation, in standard deviations
PRIORS = ("log_uniform", "half_cauchy")


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
