"""The ``compression`` problem kind: post-training low-rank compression of a model's Linear layers.

Flow of one cell (``run_compression``; the task supplies the capabilities of ``CompressionTask``):

1. ``load_model`` (memoised, see *Memoisation* below) gives the dense model; ``target_sites`` names its Linears.
   ``compression_setup`` loads it, so loading is timed as phase ``setup``.
2. Calibration statistics are computed once for each kind that the factorization and the selector ask for
   (``LowRankFactorization.needs``; selectors ask lazily through ``problem.stats``) and memoised
   (phase ``calibrate``).
3. The factorization *decomposes* every site once (``Decomposition``: W = L diag(s) R, where ``s`` are the singular
   values of the matrix that the method actually truncates -- W for SVD, W S for ASVD, diag(sqrt I) W for FWSVD,
   W Chol(XᵀX) for SVD-LLM). Decompositions are memoised per (factorization and its parameters, site): every
   selector and every budget reuses them, and selectors see the spectrum that matters for the chosen factorization.
4. The selector gets a ``RankProblem`` whose sites carry those spectra and the factorization's exact parameter
   cost, plus ``CompressionStatistics`` for data-aware selectors.
5. Each site is replaced by ``LowRankLinear`` (two Linears: in -> k -> out) at its rank -- with the extra factors of
   the factorization's ``compensation`` of the truncation beside them, where it offers one; the task evaluates, records
   ``params`` / ``param_ratio`` (weights of the targeted sites only; biases are unchanged and not counted) and the
   ranks; then the dense Linears are put back, so one loaded model serves every cell.

Which components a site keeps. A rank k (an int) keeps the *leading* k components of the site's decomposition
(W_k = sum_{i < k} s_i l_i r_i^T). A selector that chooses components individually (``sublora``,
``taylor-sensitivity``) answers ``Components((i, j, ...))`` for a site instead: exactly those components are kept
(W_S = sum_{i in S} s_i l_i r_i^T, any subset of the decomposition's components, at least one), the site's rank is
|S| and it costs ``params_at_rank(|S|)``, as a prefix of the same length would. The cell records the rank as usual
and, for every site whose kept set is not a prefix, the indices in the note ``kept_components`` (JSON).

Memoisation (``ctx.memo`` slots). ``ctx.shared`` lives for one task configuration and device but is shared by all
suite seeds. The model is therefore memoised under ``model_key(ctx)`` and the statistics and decompositions under
``calibration_key(ctx)``; both default to ``ctx.task_seed`` (always correct). A task whose model does not depend on
the seed (a pretrained checkpoint) overrides ``model_key`` to return a constant, and one whose calibration data does
not depend on it overrides ``calibration_key`` likewise, so a second suite seed reuses them. One model and one set of
statistics are held at a time: a new key replaces the old entry (the runner groups cells by task and seed).
Counters of the expensive work are kept in the memo ``"counters"``: ``calibration_passes``, ``decompositions``,
``calibration_evaluations`` and ``sigma_loss_evaluations``; every cell records what it performed itself as metrics
``work_<counter>`` (so their sum over a results folder is the suite's total).

Decompositions on disk. A task that can name its model and calibration data by content (``decomposition_cache_key``:
the LLM task hashes the checkpoint's sha256 with its parameters) gets its decompositions cached across processes,
runs and suites under ``ctx.cache_dir/decompositions/<task key>/<factorization key>/<site>.pt``. The factorization
key hashes its name, its parameters, the source of its plugin file and of this module, the device type and the
dtype, so editing the method's code or this protocol never reuses an old result. Files are written atomically and
carry a SHA-256 of their tensors, checked on every read: a damaged or foreign file is recomputed and replaced.
Counter ``decompositions_from_disk`` counts the reads; ``decompositions`` still counts the computations. Size: the factors
in the factorization's ``precision``, about 1.2 GB (float64) or 0.6 GB (float32) per factorization configuration for
SmolLM2-135M (delete the folder to reclaim it);
``RANKBENCH_NO_DECOMPOSITION_CACHE=1`` keeps them in memory only (the test suite sets it).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import inspect
import io
import itertools
import json
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TYPE_CHECKING

from rankbench.files import atomic_write
from rankbench.api import COMPRESSION, PARAM_RATIO, Factorization, RankProblem, Selector, Site, Task, lazy_attributes
from rankbench.kinds.protocol import WORK_COUNTERS, Protocol, count_work
from rankbench.kinds.tensor_compression import TensorFactorization, run_tensor_compression
from rankbench.kinds.modules import ModuleFactorization, run_module_compression

if TYPE_CHECKING:
    import torch
    from torch import nn

STATISTIC_KINDS = ("gram", "input_abs_mean", "fisher_rows", "fisher_cols", "weight_grad")

_MODEL = "compression.model"  # memo slot: {"model", "sites"} of the current model key
_CALIBRATION = "compression.calibration"  # memo slot: {"statistics", "done", "decompositions", "stores", ...}
NO_DISK_CACHE_ENV = "RANKBENCH_NO_DECOMPOSITION_CACHE"  # set (non-empty): decompositions are kept in memory only


@dataclasses.dataclass
class Decomposition:
    """W ≈ left[:, :k] @ diag(s[:k]) @ right[:k] for every k; exact at k = len(s) (up to round-off)."""

    left: torch.Tensor  # out x p
    s: torch.Tensor  # p, descending, >= 0
    right: torch.Tensor  # p x in
    note: str = ""  # a fallback the factorization took for this weight (recorded in the cell's notes)

    @property
    def rank(self) -> int:
        """p: the largest rank this decomposition offers."""
        return int(self.s.shape[0])

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with W_k = A @ B, A: out x k, B: k x in; the singular values are split evenly (sqrt) between them."""
        k = int(k)
        if k < 0:
            raise ValueError(f"rank must be >= 0, got {k}")
        root = self.s[:k].clamp_min(0).sqrt()
        return self.left[:, :k] * root, root[:, None] * self.right[:k]

    def matrix(self, k: int | None = None) -> torch.Tensor:
        """The rank-k approximation W_k = left[:, :k] diag(s[:k]) right[:k] (k = None: all of it)."""
        k = self.rank if k is None else int(k)
        return (self.left[:, :k] * self.s[:k]) @ self.right[:k]

    def factors_of(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A @ B = sum over the given components i of s_i left[:, i] right[i] (split as ``factors``)."""
        import torch
        index = torch.as_tensor([int(i) for i in indices], dtype=torch.long, device=self.s.device)
        if index.numel() == 0:
            raise ValueError("a component selection keeps at least one component")
        if int(index.min()) < 0 or int(index.max()) >= self.rank:
            raise ValueError(f"component indices must lie in 0..{self.rank - 1}, got {index.tolist()}")
        root = self.s[index].clamp_min(0).sqrt()
        return self.left[:, index] * root, root[:, None] * self.right[index]


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, Vᵀ) of ``matrix`` (m x n, p = min(m, n)) through the eigendecomposition of its smaller Gram matrix.

    For m >= n: Mᵀ M = V diag(s²) Vᵀ (``eigh``, descending), U diag(s) = M V; for m < n the same on Mᵀ. In float64
    this equals ``torch.linalg.svd(matrix, full_matrices=False)``: spectra and reconstructions agree to 1e-14 on
    SmolLM2's weights and on conditioned test matrices (``tests/test_compression_kind.py``), singular values below
    ~1e-8 s_1 are only known to ~1e-8 s_1 (they never matter for a truncation), and U's columns for such values
    are not orthonormal -- U diag(s) Vᵀ still rebuilds the matrix. It takes 0.32-0.64x the SVD's time on one CPU
    thread (576 x 576 to 576 x 1536; ``benchmarks/pytest/test_decompositions.py``). Squaring the condition
    number makes it unfit for float32 (spectrum errors of 1e-4 on SmolLM2): use it in float64 only.
    """
    import torch

    tall = matrix.shape[0] >= matrix.shape[1]
    A = matrix if tall else matrix.T
    eigenvalues, V = torch.linalg.eigh(A.T @ A)
    s = eigenvalues.flip(0).clamp_min(0).sqrt()
    V = V.flip(1)
    U = (A @ V) / torch.where(s > 0, s, torch.ones_like(s))
    return (U, s, V.T) if tall else (V, s, U.T)


@dataclasses.dataclass(frozen=True)
class Components:
    """A selector's answer for one site that names the components to keep (see the module docstring): sorted,
    distinct indices into the site's decomposition. ``int(Components(...))`` is the rank, the number kept."""

    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        indices = tuple(sorted({int(i) for i in self.indices}))
        if not indices:
            raise ValueError("a component selection keeps at least one component")
        if indices[0] < 0:
            raise ValueError(f"component indices must be >= 0, got {indices}")
        object.__setattr__(self, "indices", indices)

    def __int__(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def is_prefix(self) -> bool:
        return self.indices == tuple(range(len(self.indices)))


class LowRankFactorization(Factorization):
    """Base of the matrix factorizations of Linear weights (``svd``, ``asvd``, ``fwsvd``, ``svd-llm``, ...).

    ``decompose`` is called once per site (under ``torch.no_grad``) with the weight in the factorization's
    ``precision`` on the task's device and the ``SiteStatistics`` of the kinds listed in ``needs`` (float64; cast
    them to the weight's dtype); it returns the full ``Decomposition`` in that precision.

    ``precision``: the dtype the method needs (a float64 weight is always decomposed in float64). ``"float64"``
    (the default, always safe) or ``"float32"`` where the spectrum's norm-wise relative error against float64 stays
    below 1e-5 on the shipped models (``tests/test_decomposition_precision.py`` checks every float32 factorization on
    SmolLM2's sites): a float32 SVD takes about 0.7x the time and half the memory of a float64 one.
    """

    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics it uses (STATISTIC_KINDS)
    precision: ClassVar[str] = "float64"  # the dtype ``decompose`` works in: "float64" or "float32"

    def params_at_rank(self, shape: tuple[int, int], rank: int) -> int:
        out_features, in_features = shape
        return int(rank) * (int(out_features) + int(in_features))

    @abc.abstractmethod
    def decompose(self, weight: torch.Tensor, stats: SiteStatistics) -> Decomposition:
        """The full decomposition of one weight (out x in, in ``precision``) given its calibration statistics."""

    @property
    def decomposed_by(self) -> LowRankFactorization:
        """The factorization whose ``decompose`` gives this one's decompositions: itself, or another one it builds on
        (a compensation method over a base factorization), so that they are computed, memoised and cached on disk
        once under that one's identity, whatever this one's own parameters."""
        return self

    def compensation(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     stats: SiteStatistics) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra factors (C: out x r, D: r x in) a site keeps beside its truncation W' = A @ B (the factors the
        selector's rank gave, float64), fitted from the dense ``weight`` (the site's Linear weight, any dtype) and
        its statistics (kinds in ``needs``). The site becomes [A C] [B; D] (rank k + r); ``params_at_rank`` must
        count C and D. None (default): no compensation."""
        return None


@dataclasses.dataclass
class SiteStatistics:
    """Calibration statistics of one Linear (float64, on the task's device); None where not computed."""

    gram: torch.Tensor | None = None  # Σ over calibration tokens of x xᵀ (in x in): XᵀX
    input_abs_mean: torch.Tensor | None = None  # mean over tokens of |x| per input channel (in)
    fisher_rows: torch.Tensor | None = None  # Σ_j E_batches[(∂L/∂W_ij)²] per output row (out)
    fisher_cols: torch.Tensor | None = None  # Σ_i E_batches[(∂L/∂W_ij)²] per input column (in)
    weight_grad: torch.Tensor | None = None  # ∂L/∂W of the mean calibration loss at the dense model (out x in)
    tokens: int = 0


def save_weights(path: Path, model: nn.Module) -> None:
    """Write ``model``'s state dict to ``path`` atomically (a temporary file, then a rename)."""
    import torch
    atomic_write(path, lambda handle: torch.save(model.state_dict(), handle))


def cached_weights(model: nn.Module, path: Path | None, train: Callable[[nn.Module], object]) -> nn.Module:
    """``model`` with the trained weights cached at ``path``; when there are none, ``train(model)`` runs and its
    result is cached (``path`` None: no cache). How tasks share one trained network between cells and processes."""
    import torch
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        train(model)
        if path is not None:
            save_weights(path, model)
    return model


class CompressionTask(Task):
    """What a task of the compression kind supplies: its dense model, the sites, calibration data and evaluation.
    The protocol (``run_compression``) does the rest; the memoised model, statistics and decompositions below are
    derived from these capabilities, once per task configuration (see *Memoisation* in the module docstring)."""

    problem_kind: ClassVar[str] = COMPRESSION
    budget_kind: ClassVar[str | None] = PARAM_RATIO

    # -- what a concrete task provides ---------------------------------------------------------------------------
    @abc.abstractmethod
    def load_model(self, ctx) -> nn.Module:
        """The dense model in eval mode on ``ctx.device`` (called once per ``model_key``; memoised)."""

    @abc.abstractmethod
    def target_sites(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Qualified name -> Linear for every site to compress, in model order."""

    @abc.abstractmethod
    def calibration_batches(self, ctx) -> Iterable[Any]:
        """Model inputs for calibration (fixed for a ``calibration_key``)."""

    @abc.abstractmethod
    def calibration_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of the model on one calibration batch (a scalar tensor)."""

    @abc.abstractmethod
    def evaluate(self, ctx, model: nn.Module) -> None:
        """Record the task's quality metrics for ``model`` through ``ctx.metric``."""

    def model_key(self, ctx) -> Hashable:
        """What ``load_model`` depends on besides the task parameters; return a constant if not the seed."""
        return ctx.task_seed

    def calibration_key(self, ctx) -> Hashable:
        """What ``calibration_batches`` depends on besides the task parameters; a constant if not the seed."""
        return ctx.task_seed

    def decomposition_cache_key(self, ctx) -> str | None:
        """A content key of the model and calibration data (e.g. a checkpoint's hash with the task parameters), so
        decompositions can be reused from disk across runs and suites; None (default): memory only."""
        return None

    def transformer_blocks(self, model: nn.Module) -> list | None:
        """The model's transformer blocks as ``rankbench.kinds.modules.TransformerBlock`` (module-level
        factorizations compress their modules jointly); None (default): not offered, those factorizations skip."""
        return None

    # -- derived from the capabilities, memoised per task configuration ---------------------------------------------
    def model(self, ctx) -> nn.Module:
        """The dense model, loaded once per ``model_key`` (a new key frees the old model and its statistics)."""
        return self._model_slot(ctx)["model"]

    def sites(self, ctx) -> dict[str, nn.Linear]:
        """The dense site Linears, memoised with the model (still the dense ones while a cell has them swapped out)."""
        return self._model_slot(ctx)["sites"]

    def _model_slot(self, ctx) -> dict:
        def load() -> dict:
            ctx.shared.pop(_CALIBRATION, None)  # the old model's statistics go with it
            model = self.load_model(ctx)
            sites = dict(self.target_sites(model))
            if not sites:
                raise ValueError(f"task {self.name!r} names no sites to compress")
            return {"model": model, "sites": sites}

        return ctx.memo(self.model_key(ctx), load, slot=_MODEL)

    def calibration_memo(self, ctx) -> dict:
        """Everything computed from the calibration data of the current model and ``calibration_key``: statistics,
        decompositions, selectors' stores, tensor-format fits. Replaced (freed) when either key changes."""
        self.model(ctx)
        fresh = {"statistics": {}, "done": set(), "decompositions": {}, "stores": {}}
        return ctx.memo(self.calibration_key(ctx), lambda: fresh, slot=_CALIBRATION)

    def _check_dense(self, ctx, doing: str) -> None:
        model = self.model(ctx)
        for name, linear in self.sites(ctx).items():
            if model.get_submodule(name) is not linear:
                raise RuntimeError(f"{doing} needs the dense model, but site {name!r} is replaced")

    def statistics(self, ctx, kinds: Iterable[str]) -> dict[str, SiteStatistics]:
        """Calibration statistics of every site, computed once per ``calibration_key`` for each kind asked for."""
        wanted = set(kinds)
        unknown = wanted - set(STATISTIC_KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STATISTIC_KINDS}")
        slot = self.calibration_memo(ctx)
        store: dict[str, SiteStatistics] = slot["statistics"]
        missing = wanted - slot["done"]
        if missing:
            self._check_dense(ctx, "computing calibration statistics")
            count_work(ctx, "calibration_passes")
            collect_statistics(self, ctx, self.model(ctx), missing, store)
            slot["done"] |= missing
        return store

    def decomposition(self, ctx, factorization: LowRankFactorization, name: str) -> Decomposition:
        """The factorization's full decomposition of site ``name``, computed once per calibration_key.

        Only one factorization's decompositions are held at a time (in its ``precision``; in float64 about twice
        the sites' weights): the suite runs a task configuration's cells factorization by factorization, so
        switching to another one frees the previous set (an LLM cell then peaks near one set instead of one per
        factorization decomposed so far).
        """
        import torch
        factorization = factorization.decomposed_by  # a factorization may reuse another's decomposition
        slot = self.calibration_memo(ctx)
        cache = slot["decompositions"]
        owner = factorization.identity
        if slot.get("decomposed_by") != owner:
            cache.clear()
            slot["decomposed_by"] = owner
        key = (*owner, name)
        if key not in cache:
            dense = self.sites(ctx)[name].weight.detach()
            # the factorization's precision, never below the weight's own (a float64 model stays exact)
            precision = torch.float64 if dense.dtype == torch.float64 else getattr(torch, factorization.precision)
            weight = dense.to(precision)
            path = self._decomposition_path(ctx, factorization, name, weight)
            result = read_decomposition(path, weight.device) if path is not None else None
            from_disk = result is not None
            if from_disk:
                count_work(ctx, "decompositions_from_disk")
            else:
                stats = self.statistics(ctx, factorization.needs).get(name, SiteStatistics())
                count_work(ctx, "decompositions")
                with torch.no_grad():
                    result = factorization.decompose(weight, stats)
            out_features, in_features = weight.shape
            p = result.s.shape[0]
            if result.left.shape != (out_features, p) or result.right.shape != (p, in_features):
                raise ValueError(
                    f"{factorization.name} returned factors {tuple(result.left.shape)}, {tuple(result.s.shape)}, "
                    f"{tuple(result.right.shape)} for a {out_features} x {in_features} weight"
                )
            if path is not None and not from_disk:
                write_decomposition(path, result)
            cache[key] = result
        return cache[key]

    def _decomposition_path(self, ctx, factorization: LowRankFactorization, name: str,
                            weight: torch.Tensor) -> Path | None:
        if os.environ.get(NO_DISK_CACHE_ENV):
            return None
        slot = self.calibration_memo(ctx)
        if "disk_key" not in slot:  # asked once per model and calibration data, not once per site
            slot["disk_key"] = self.decomposition_cache_key(ctx)
        task_key = slot["disk_key"]
        if task_key is None or getattr(ctx, "cache_dir", None) is None:
            return None
        method = json.dumps([*factorization.identity, _source_hash(type(factorization)),
                             _source_hash(CompressionTask), weight.device.type, str(weight.dtype)])
        method_key = hashlib.sha256(method.encode()).hexdigest()[:20]
        site = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        return Path(ctx.cache_dir) / "decompositions" / task_key[:24] / method_key / f"{site}.pt"


@functools.lru_cache(maxsize=None)
def _source_hash(cls: type) -> str:
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(cls)).read_bytes()).hexdigest()[:16]
    except (OSError, TypeError):
        return "unknown"


def _tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_decomposition(path: Path, result: Decomposition) -> None:
    """Save a decomposition atomically with a SHA-256 of its tensors (a full disk only costs the cache)."""
    import torch
    tensors = (result.left, result.s, result.right)
    payload = {"left": result.left.cpu(), "s": result.s.cpu(), "right": result.right.cpu(), "note": result.note,
               "sha256": _tensors_digest(tensors)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        atomic_write(path, buffer.getvalue())
    except OSError:
        pass


def read_decomposition(path: Path, device: torch.device) -> Decomposition | None:
    """The decomposition at ``path`` if it exists and its tensors match their recorded SHA-256; else None."""
    import torch
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        tensors = (payload["left"], payload["s"], payload["right"])
        if _tensors_digest(tensors) != payload["sha256"]:
            return None
    except Exception:  # truncated, foreign or unpicklable: recompute and replace
        return None
    left, s, right = (t.to(device) for t in tensors)
    return Decomposition(left=left, s=s, right=right, note=str(payload.get("note") or ""))


# -- the protocol ------------------------------------------------------------------------------------------------------
def compression_skip(task: CompressionTask, selector: Selector, factorization: Factorization) -> str | None:
    if not isinstance(factorization, (LowRankFactorization, TensorFactorization, ModuleFactorization)):
        return f"factorization {factorization.name} cannot compress Linear weights"
    if isinstance(factorization, ModuleFactorization) and (
            type(task).transformer_blocks is CompressionTask.transformer_blocks):
        return f"factorization {factorization.name} compresses transformer modules; task {task.name} exposes no blocks"
    return None


def compression_setup(task: CompressionTask, ctx) -> None:
    """Load the dense model (timed as phase ``setup``; a training task trains it here the first time)."""
    task.model(ctx)


def run_compression_reference(task: CompressionTask, ctx) -> None:
    model = task.model(ctx)
    dense = sum(m.weight.numel() for m in task.sites(ctx).values())
    with ctx.phase("evaluate"):
        task.evaluate(ctx, model)
    ctx.record_size(dense, dense)


def run_compression(task: CompressionTask, ctx, selector: Selector,
                    factorization: LowRankFactorization | TensorFactorization) -> None:
    before = dict(ctx.memo(WORK_COUNTERS, dict))
    if isinstance(factorization, TensorFactorization):
        run_tensor_compression(task, ctx, selector, factorization)
    elif isinstance(factorization, ModuleFactorization):
        run_module_compression(task, ctx, selector, factorization)
    else:
        _run_low_rank(task, ctx, selector, factorization)
    for name, total in sorted(ctx.memo(WORK_COUNTERS, dict).items()):
        ctx.metric(f"work_{name}", total - before.get(name, 0), "", None)


def _run_low_rank(task: CompressionTask, ctx, selector: Selector, factorization: LowRankFactorization) -> None:
    model = task.model(ctx)
    sites = task.sites(ctx)
    with ctx.phase("calibrate"):
        task.statistics(ctx, factorization.needs)
    with ctx.phase("decompose"):
        decompositions = {name: task.decomposition(ctx, factorization, name) for name in sites}
    fallbacks = {name: d.note for name, d in decompositions.items() if d.note}
    if fallbacks:
        ctx.note(f"{factorization.name}_fallbacks", json.dumps(fallbacks, sort_keys=True))
    problem = RankProblem(
        sites=[
            Site(
                name=name,
                shape=tuple(linear.weight.shape),
                singular_values=decompositions[name].s.detach().cpu().numpy(),
                params_at_rank=lambda k, shape=tuple(linear.weight.shape): factorization.params_at_rank(shape, k),
                max_rank=decompositions[name].rank,
            )
            for name, linear in sites.items()
        ],
        budget=ctx.budget,
        budget_kind=ctx.budget_kind,
        seed=ctx.seed,
        stats=CompressionStatistics(task, ctx, factorization),
        device=ctx.device,
    )
    with ctx.phase("select"):
        ranks = selector.select(problem)
    dense = kept = 0
    statistics = task.statistics(ctx, factorization.needs)
    with swapped(model, sites, factorization, decompositions, ranks, statistics) as chosen:
        for name, linear in sites.items():
            shape = tuple(linear.weight.shape)
            dense += linear.weight.numel()
            params = factorization.params_at_rank(shape, chosen[name])
            kept += params
            ctx.ranks(name, chosen[name], params)
        with ctx.phase("evaluate"):
            task.evaluate(ctx, model)
    ctx.record_size(kept, dense)
    selected = {name: list(answer.indices) for name, answer in ranks.items()
                if isinstance(answer, Components) and not answer.is_prefix}
    if selected:
        ctx.note("kept_components", json.dumps(selected, sort_keys=True))


class CompressionStatistics:
    """What data-aware selectors may ask of a compression task (``problem.stats``), for one cell's factorization.

    * ``gram(site)``, ``input_abs_mean(site)``, ``fisher_rows(site)``, ``fisher_cols(site)``, ``weight_grad(site)``:
      the site's calibration statistics (``SiteStatistics``), each computed once per calibration key;
    * ``decomposition(site)``: the factorization's ``Decomposition`` of the site;
    * ``store()``: a dict that selectors may memoise their own expensive work in: one per factorization (and its
      parameters), living exactly as long as that factorization's decompositions (same calibration key, same worker
      process), so every budget and selector cell of the configuration sees it;
    * ``calibration_loss(ranks)``: the mean calibration loss with the given sites compressed at the given ranks (or
      ``Components``; the others dense);
    * ``sigma_loss({site: sigma})``: a differentiable mean calibration loss where each listed site's weight is
      left diag(sigma) right of its decomposition (sigma of any length <= p: the leading components), for first and
      second derivatives with respect to singular values (autograd gradients and Hessian-vector products). The
      model's own parameters are frozen while the graph is built, so the graph leads to the sigmas only.

    The mean calibration loss is the plain mean of the per-batch ``calibration_loss`` values; ``max_batches`` limits
    both losses to the first batches.
    """

    def __init__(self, task: CompressionTask, ctx, factorization: LowRankFactorization):
        self.task, self.ctx, self.factorization = task, ctx, factorization

    def _site_statistic(self, kind: str, site: str) -> torch.Tensor:
        return getattr(self.task.statistics(self.ctx, [kind])[site], kind)

    def gram(self, site: str) -> torch.Tensor:
        return self._site_statistic("gram", site)

    def input_abs_mean(self, site: str) -> torch.Tensor:
        return self._site_statistic("input_abs_mean", site)

    def fisher_rows(self, site: str) -> torch.Tensor:
        return self._site_statistic("fisher_rows", site)

    def fisher_cols(self, site: str) -> torch.Tensor:
        return self._site_statistic("fisher_cols", site)

    def weight_grad(self, site: str) -> torch.Tensor:
        return self._site_statistic("weight_grad", site)

    def decomposition(self, site: str) -> Decomposition:
        return self.task.decomposition(self.ctx, self.factorization, site)

    def store(self) -> dict:
        return self.task.calibration_memo(self.ctx)["stores"].setdefault(self.factorization.identity, {})

    def _sites(self, names: Iterable[str]) -> dict[str, nn.Linear]:
        sites = self.task.sites(self.ctx)
        unknown = set(names) - set(sites)
        if unknown:
            raise KeyError(f"unknown sites {sorted(unknown)}")
        return {name: linear for name, linear in sites.items() if name in set(names)}

    def sigma_loss(self, sigmas: dict[str, torch.Tensor], max_batches: int | None = None) -> torch.Tensor:
        from rankbench.kinds.layers import SigmaLinear
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch
        task, ctx = self.task, self.ctx
        model = task.model(ctx)
        sites = self._sites(sigmas)
        decompositions = {name: task.decomposition(ctx, self.factorization, name) for name in sites}
        count_work(ctx, "sigma_loss_evaluations")
        frozen = [p for p in model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            for name, linear in sites.items():
                model.set_submodule(name, SigmaLinear(decompositions[name], sigmas[name], linear))
            # Fused attention kernels (flash / memory-efficient SDPA) have no double backward; the math kernel
            # does, so Hessian-vector products through attention models work.
            with sdpa_kernel(SDPBackend.MATH):
                batches = _first(task.calibration_batches(ctx), max_batches)
                losses = [task.calibration_loss(model, batch) for batch in batches]
        finally:
            for name, linear in sites.items():
                model.set_submodule(name, linear)
            for p in frozen:
                p.requires_grad_(True)
        if not losses:
            raise ValueError("the task yielded no calibration batches")
        return torch.stack(losses).mean()

    def calibration_loss(self, ranks: dict[str, int], max_batches: int | None = None) -> float:
        import torch
        task, ctx = self.task, self.ctx
        model = task.model(ctx)
        sites = self._sites(ranks)
        decompositions = {name: task.decomposition(ctx, self.factorization, name) for name in sites}
        count_work(ctx, "calibration_evaluations")
        statistics = task.statistics(ctx, self.factorization.needs)
        with swapped(model, sites, self.factorization, decompositions, ranks, statistics), torch.no_grad():
            losses = [float(task.calibration_loss(model, batch))
                      for batch in _first(task.calibration_batches(ctx), max_batches)]
        if not losses:
            raise ValueError("the task yielded no calibration batches")
        return sum(losses) / len(losses)


class swapped:
    """Context manager: replace each site by ``LowRankLinear`` at its rank (clipped to [1, p]; the leading components)
    or with exactly its ``Components``, and put the dense Linears back after -- also when building or installing the
    replacements fails half-way. Entering returns the rank (number of components kept) of every site."""

    def __init__(self, model, sites, factorization, decompositions, ranks, statistics=None):
        self.model, self.sites, self.factorization = model, sites, factorization
        self.decompositions, self.ranks = decompositions, ranks
        self.statistics = statistics or {}  # site -> SiteStatistics, for the factorization's ``compensation``

    def __enter__(self) -> dict[str, int]:
        from rankbench.kinds.layers import LowRankLinear
        chosen, modules = {}, {}
        for name, linear in self.sites.items():  # build everything first: nothing is touched if a rank is bad
            if name not in self.ranks:
                raise ValueError(f"the selector gave no rank for site {name!r}")
            answer = self.ranks[name]
            decomposition = self.decompositions[name]
            if isinstance(answer, Components):
                if answer.indices[-1] >= decomposition.rank:
                    raise ValueError(
                        f"site {name!r} offers components 0..{decomposition.rank - 1}, the selector kept {answer.indices}"
                    )
                rank = len(answer)
                A, B = decomposition.factors_of(answer.indices)
            else:
                try:
                    rank = int(answer)
                except (TypeError, ValueError):
                    raise ValueError(f"site {name!r} takes one integer rank, got {answer!r}") from None
                rank = max(1, min(rank, decomposition.rank))
                A, B = decomposition.factors(rank)
            weight = linear.weight
            A, B = self._compensated(name, weight, A, B)
            bias = None if linear.bias is None else linear.bias.detach()
            module = LowRankLinear(A.to(device=weight.device, dtype=weight.dtype), B.to(weight), bias)
            module.requires_grad_(weight.requires_grad)
            modules[name], chosen[name] = module, rank
        try:
            for name, module in modules.items():
                self.model.set_submodule(name, module)
        except BaseException:
            self.__exit__()
            raise
        return chosen

    def _compensated(self, name, weight, A, B):
        """[A C], [B; D] with the factorization's ``compensation`` (C, D) of the site, or (A, B) without one."""
        import torch
        extra = self.factorization.compensation(weight.detach(), A, B, self.statistics.get(name, SiteStatistics()))
        if extra is None:
            return A, B
        C, D = extra
        return torch.cat([A, C.to(A)], dim=1), torch.cat([B, D.to(B)], dim=0)

    def __exit__(self, *exc) -> None:
        for name, linear in self.sites.items():
            self.model.set_submodule(name, linear)


def _first(batches: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    """The first ``max_batches`` calibration batches (all of them for None): cheaper estimates for selectors that
    evaluate the loss many times (ASVD's sensitivity table, SubLoRA's Hessian)."""
    return batches if max_batches is None else itertools.islice(batches, max_batches)


def collect_statistics(task: CompressionTask, ctx, model: nn.Module, kinds: set[str], store: dict) -> None:
    """One calibration pass over ``task.calibration_batches(ctx)``, filling ``store[site]`` for ``kinds``.

    Forward hooks accumulate, in float64, XᵀX and Σ|x| of every site's input (all leading dimensions are tokens).
    With ``fisher_rows``/``fisher_cols``/``weight_grad`` each batch's loss is also differentiated with respect to the
    site weights only (every other parameter is frozen for the pass): ``fisher_rows`` = the per-batch empirical Fisher
    summed over each output row, Σ_j (∂L_batch/∂W_ij)² averaged over batches; ``fisher_cols`` = the same summed over
    each input column, Σ_i (∂L_batch/∂W_ij)² averaged over batches (FWSVD's two axes); ``weight_grad`` = the mean of
    the per-batch gradients, i.e. the gradient of the mean calibration loss. A site that the batches never reach
    gets zeros. Asking for more kinds never changes the numbers of the others.
    """
    import torch
    kinds = set(kinds)
    sites = dict(task.target_sites(model))
    for name in sites:
        store.setdefault(name, SiteStatistics())
    need_inputs = bool(kinds & {"gram", "input_abs_mean"})
    need_grads = bool(kinds & {"fisher_rows", "fisher_cols", "weight_grad"})
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in sites}
    counts = dict.fromkeys(sites, 0)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            acc = sums[name]
            if "gram" in kinds:
                acc["gram"] = acc.get("gram", 0) + x.T @ x
            if "input_abs_mean" in kinds:
                acc["abs"] = acc.get("abs", 0) + x.abs().sum(dim=0)
            counts[name] += x.shape[0]

        return record

    site_params = [linear.weight for linear in sites.values()]
    site_ids = {id(p) for p in site_params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in site_ids] if need_grads else []
    flags = [p.requires_grad for p in site_params]
    handles = [linear.register_forward_hook(hook(name)) for name, linear in sites.items()] if need_inputs else []
    batches = 0
    try:
        for p in site_params:
            p.requires_grad_(need_grads)
        for p in others:
            p.requires_grad_(False)
        for batch in task.calibration_batches(ctx):
            batches += 1
            if need_grads:
                loss = task.calibration_loss(model, batch)
                grads = torch.autograd.grad(loss, site_params, allow_unused=True)
                for (name, linear), grad in zip(sites.items(), grads):
                    if grad is None:
                        grad = torch.zeros_like(linear.weight)
                    g = grad.detach().to(torch.float64)
                    acc = sums[name]
                    acc["fisher"] = acc.get("fisher", 0) + (g * g).sum(dim=1)
                    acc["fisher_cols"] = acc.get("fisher_cols", 0) + (g * g).sum(dim=0)
                    acc["grad"] = acc.get("grad", 0) + g
            else:
                with torch.no_grad():
                    task.calibration_loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(site_params, flags):
            p.requires_grad_(flag)
        for p in others:
            p.requires_grad_(True)
    if batches == 0:
        raise ValueError("the task yielded no calibration batches")
    for name, linear in sites.items():
        acc, stats = sums[name], store[name]
        out_features, in_features = linear.weight.shape
        zeros = {"dtype": torch.float64, "device": linear.weight.device}
        if "gram" in kinds:
            stats.gram = acc.get("gram", torch.zeros(in_features, in_features, **zeros))
        if "input_abs_mean" in kinds:
            stats.input_abs_mean = acc.get("abs", torch.zeros(in_features, **zeros)) / max(counts[name], 1)
        if "fisher_rows" in kinds:
            stats.fisher_rows = acc["fisher"] / batches
        if "fisher_cols" in kinds:
            stats.fisher_cols = acc["fisher_cols"] / batches
        if "weight_grad" in kinds:
            stats.weight_grad = acc["grad"] / batches
        if need_inputs:
            stats.tokens = counts[name]


def iter_named_linears(module: nn.Module, include: Iterable[str]) -> Iterator[tuple[str, nn.Linear]]:
    """Linears whose qualified name contains one of ``include`` (e.g. ``("self_attn", "mlp")``)."""
    from torch import nn
    patterns = tuple(include)
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and any(p in name for p in patterns):
            yield name, child


PROTOCOL = Protocol(
    COMPRESSION, CompressionTask, run=run_compression, reference=run_compression_reference, skip=compression_skip,
    setup=compression_setup,
)


# these names live in layers (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(__name__, "rankbench.kinds.layers", {"LowRankLinear", "SigmaLinear"})
