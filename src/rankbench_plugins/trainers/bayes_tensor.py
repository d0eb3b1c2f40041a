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

The layers (``BayesTensorLinear``, ``VariationalTensorLinear``), ``em_update``, the random init, ``build_layer`` and
the Pyro model (``TensorizedSVI``) live in ``_bayes_layers`` (torch, Pyro), imported when a run builds them; this
module (the plugin's registration) imports neither.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from rankbench.api import PluginParams, hookimpl, lazy_attributes
from rankbench.kinds.training import RankAdaptiveTrainer

if TYPE_CHECKING:
    from rankbench.kinds.training import TrainingRun
    from rankbench_plugins.trainers._bayes_layers import (  # noqa: F401
        BayesTensorLinear,
        TensorizedSVI,
        VariationalTensorLinear,
        build_layer,
        em_update,
    )


# these names live in _bayes_layers (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(
    __name__, "rankbench_plugins.trainers._bayes_layers",
    {"build_layer", "em_update", "max_ranks", "PRIORS", "TensorizedSVI", "VariationalTensorLinear"},
)


def kl_multiplier_at(epoch: int, kl_multiplier: float, no_kl_epochs: float, warmup_epochs: float) -> float:
    """(3): kl_multiplier * clamp((epoch - no_kl_epochs) / warmup_epochs, 0, 1); warmup 0 is a step."""
    if warmup_epochs <= 0:
        return kl_multiplier if epoch > no_kl_epochs else 0.0
    return kl_multiplier * min(max((epoch - no_kl_epochs) / warmup_epochs, 0.0), 1.0)


def count_examples(batches) -> int:
    """Examples in one epoch's minibatches: the leading dimension of each batch (a tensor), of its first element (a
    tuple / list, e.g. (x, y)) or of its first value (a dict). Raises for batches of another kind."""
    import torch

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
            # compared with the default, not with model_fields_set: a cell carries its resolved parameters (every
            # field) to the worker, where they are validated again
            default = type(self).model_fields["kl_multiplier"].default
            if self.inference == "svi" and self.kl_multiplier != default:
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
        from rankbench.kinds.tensor_compression import TensorFactorization
        from rankbench_plugins.trainers._bayes_layers import build_layer

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
        import torch

        from rankbench_plugins.trainers._bayes_layers import TensorizedSVI

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
