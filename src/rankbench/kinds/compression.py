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
``calibration_evaluations``, ``replayed_blocks`` (blocks not run in them, ``PrefixReplay``) and
``sigma_loss_evaluations``; every cell records what it performed itself as metrics
``work_<counter>`` (so their sum over a results folder is the suite's total).

Streaming (``CompressionTask.decompositions``). A task that names its model's sequential blocks (``site_blocks``:
the LLM task's decoder layers) has the input statistics of a factorization (XᵀX, mean |x|) computed block by block
from the residual stream (``streamed_input_statistics``); each block's sites are decomposed as soon as their
statistics exist, and the statistics are dropped before the next block. A cell therefore holds one block's Gram
matrices instead of every site's (for an 8B Llama: ~0.5 GB in float64 instead of ~20 GB). Sites fed the same input
(q/k/v, gate/up) share one Gram matrix in either pass (``InputStatistics``). The streamed statistics equal the
whole-model pass's, so streamed and unstreamed cells give the same numbers (``tests/test_streamed_compression.py``).
Gradient statistics (FWSVD's Fisher vectors, first-order scores' ``weight_grad``) still take one whole pass, and a
factorization with a ``compensation`` (EoRA) asks for its statistics of every site at once.

Decompositions on disk. A task that can name its model and calibration data by content (``decomposition_cache_key``:
the LLM task hashes the checkpoint's sha256 with its parameters) gets its decompositions cached across processes,
runs and suites under ``ctx.cache_dir/decompositions/<task key>/<factorization key>/<site>.pt``. The factorization
key hashes its name, its parameters, the source of its plugin file and of this module, the device type and the
dtype, so editing the method's code or this protocol never reuses an old result. Files are written atomically, with
the SHA-256 of the file beside it (``<site>.pt.sha256``), checked on every read: a damaged or foreign file is
recomputed and replaced. The factors are held memory-mapped from the file (``torch.load(mmap=True)``; the left factor
is stored transposed, so the leading k components of both factors are contiguous): a cell reads from disk only the
components it keeps, and the decompositions of all sites never need to be resident at once.
Counter ``decompositions_from_disk`` counts the reads; ``decompositions`` still counts the computations. Size: the factors
in the factorization's ``precision``, about 1.2 GB (float64) or 0.6 GB (float32) per factorization configuration for
SmolLM2-135M (delete the folder to reclaim it);
``RANKBENCH_NO_DECOMPOSITION_CACHE=1`` keeps them in memory only (the test suite sets it).
"""

from __future__ import annotations

import abc
import contextlib
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
from rankbench.measure import release_freed_memory
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

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        """A slice of ``left``/``right`` on the spectrum's device: factors read from the disk cache stay memory-mapped
        on the CPU (only the slices used are read), the spectrum lives on the task's device."""
        return t.to(self.s.device)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with W_k = A @ B, A: out x k, B: k x in; the singular values are split evenly (sqrt) between them."""
        k = int(k)
        if k < 0:
            raise ValueError(f"rank must be >= 0, got {k}")
        root = self.s[:k].clamp_min(0).sqrt()
        return self._here(self.left[:, :k]) * root, root[:, None] * self._here(self.right[:k])

    def matrix(self, k: int | None = None) -> torch.Tensor:
        """The rank-k approximation W_k = left[:, :k] diag(s[:k]) right[:k] (k = None: all of it)."""
        k = self.rank if k is None else int(k)
        return (self._here(self.left[:, :k]) * self.s[:k]) @ self._here(self.right[:k])

    def factors_of(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A @ B = sum over the given components i of s_i left[:, i] right[i] (split as ``factors``)."""
        import torch
        index = torch.as_tensor([int(i) for i in indices], dtype=torch.long, device=self.s.device)
        if index.numel() == 0:
            raise ValueError("a component selection keeps at least one component")
        if int(index.min()) < 0 or int(index.max()) >= self.rank:
            raise ValueError(f"component indices must lie in 0..{self.rank - 1}, got {index.tolist()}")
        root = self.s[index].clamp_min(0).sqrt()
        cpu_index = index.to(self.left.device)
        return self._here(self.left[:, cpu_index]) * root, root[:, None] * self._here(self.right[cpu_index])


class MappedDecomposition(Decomposition):
    """A decomposition in the disk cache (``write_decomposition``): the spectrum held in memory, the factors
    memory-mapped from the file afresh at each access of ``left``/``right`` -- only the rows a caller slices are
    read, and the mapping goes away with the slice, so the decompositions of every site never count towards the
    process's resident memory at once."""

    def __init__(self, path: Path, s: torch.Tensor, note: str = ""):
        self.path, self.s, self.note = path, s, note

    def _mapped(self, key: str) -> torch.Tensor:
        import torch
        return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)[key]

    @property
    def left(self) -> torch.Tensor:
        return self._mapped("left_t").T

    @property
    def right(self) -> torch.Tensor:
        return self._mapped("right")


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

    def site_blocks(self, model: nn.Module) -> list[str] | None:
        """Qualified names of the model's sequential blocks, in order (a transformer's decoder layers: each takes the
        residual stream the previous one returns as its first input). Offered, they let the protocol stream a
        factorization's input statistics and decompositions block by block (``decompositions``) instead of holding
        every site's Gram matrix at once. None (default): one pass over the whole model."""
        return None

    def decompositions(self, ctx, factorization: LowRankFactorization) -> dict[str, Decomposition]:
        """The factorization's decomposition of every site (``decomposition``), timing phases ``calibrate`` and
        ``decompose``.

        Streamed when the factorization needs input statistics (``gram``, ``input_abs_mean``) not yet computed and the
        task offers ``site_blocks`` covering every site still to decompose: block by block, the block's statistics are
        computed (``streamed_input_statistics``), its sites decomposed, and the statistics dropped; gradient statistics
        (vectors, except ``weight_grad``) still come from one whole pass. With the disk cache, each decomposition is
        written as soon as it is computed and kept memory-mapped, so a cell holds the model, one block's statistics
        and decompositions, and the spectra. The results equal the unstreamed ones (same statistics).
        """
        sites = self.sites(ctx)
        base = factorization.decomposed_by
        slot = self.calibration_memo(ctx)
        self._hold_decompositions_of(slot, base)
        todo = [name for name in sites if (*base.identity, name) not in slot["decompositions"]
                and not self._load_decomposition(ctx, base, name)]
        streamed_kinds = INPUT_KINDS & set(base.needs) - slot["done"]
        blocks = self.site_blocks(self.model(ctx)) if todo and streamed_kinds else None
        if blocks and all(any(name.startswith(block + ".") for block in blocks) for name in todo):
            with ctx.phase("calibrate"):
                whole = self.statistics(ctx, set(base.needs) - INPUT_KINDS)
            self._check_dense(ctx, "streaming calibration statistics")
            count_work(ctx, "calibration_passes")
            stream = streamed_input_statistics(self, ctx, self.model(ctx), blocks,
                                               {name: sites[name] for name in todo}, streamed_kinds)
            while True:
                with ctx.phase("calibrate"):
                    block = next(stream, None)
                if block is None:
                    break
                with ctx.phase("decompose"):
                    for name, stats in block[1].items():
                        merged = dataclasses.replace(whole.get(name, SiteStatistics()), **{
                            kind: getattr(stats, kind) for kind in streamed_kinds}, tokens=stats.tokens)
                        self._decompose_site(ctx, base, name, merged)
                del block, stats, merged
                release_freed_memory()
        else:
            with ctx.phase("calibrate"):
                self.statistics(ctx, base.needs)
        with ctx.phase("decompose"):
            return {name: self.decomposition(ctx, factorization, name) for name in sites}

    def _hold_decompositions_of(self, slot: dict, factorization: LowRankFactorization) -> None:
        """Only one factorization's decompositions are held at a time: switching frees the previous set."""
        if slot.get("decomposed_by") != factorization.identity:
            slot["decompositions"].clear()
            slot["decomposed_by"] = factorization.identity

    def decomposition(self, ctx, factorization: LowRankFactorization, name: str) -> Decomposition:
        """The factorization's full decomposition of site ``name``, computed once per calibration_key.

        Only one factorization's decompositions are held at a time (in its ``precision``; in float64 about twice
        the sites' weights, unless read memory-mapped from the disk cache): the suite runs a task configuration's
        cells factorization by factorization, so switching to another one frees the previous set (an LLM cell then
        peaks near one set instead of one per factorization decomposed so far).
        """
        factorization = factorization.decomposed_by  # a factorization may reuse another's decomposition
        slot = self.calibration_memo(ctx)
        self._hold_decompositions_of(slot, factorization)
        key = (*factorization.identity, name)
        if key not in slot["decompositions"] and not self._load_decomposition(ctx, factorization, name):
            stats = self.statistics(ctx, factorization.needs).get(name, SiteStatistics())
            self._decompose_site(ctx, factorization, name, stats)
        return slot["decompositions"][key]

    def _site_weight(self, ctx, factorization: LowRankFactorization, name: str) -> torch.Tensor:
        """The site's dense weight in the factorization's precision, never below the weight's own."""
        import torch
        dense = self.sites(ctx)[name].weight.detach()
        return dense.to(torch.float64 if dense.dtype == torch.float64 else getattr(torch, factorization.precision))

    def _load_decomposition(self, ctx, factorization: LowRankFactorization, name: str) -> bool:
        """Memoise the site's decomposition from the disk cache if a verified one is there."""
        import torch
        dense = self.sites(ctx)[name].weight
        precision = torch.float64 if dense.dtype == torch.float64 else getattr(torch, factorization.precision)
        path = self._decomposition_path(ctx, factorization, name, dense.device, precision)
        result = read_decomposition(path, dense.device) if path is not None else None
        if result is None:
            return False
        count_work(ctx, "decompositions_from_disk")
        self.calibration_memo(ctx)["decompositions"][(*factorization.identity, name)] = result
        return True

    def _decompose_site(self, ctx, factorization: LowRankFactorization, name: str, stats: SiteStatistics) -> None:
        """Decompose one site, check the factors' shapes, write them to the disk cache (then hold them
        memory-mapped from there) and memoise them."""
        import torch
        weight = self._site_weight(ctx, factorization, name)
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
        path = self._decomposition_path(ctx, factorization, name, weight.device, weight.dtype)
        if path is not None and write_decomposition(path, result):
            result = read_decomposition(path, weight.device, verify=False) or result
        self.calibration_memo(ctx)["decompositions"][(*factorization.identity, name)] = result

    def _decomposition_path(self, ctx, factorization: LowRankFactorization, name: str, device,
                            dtype) -> Path | None:
        if os.environ.get(NO_DISK_CACHE_ENV):
            return None
        slot = self.calibration_memo(ctx)
        if "disk_key" not in slot:  # asked once per model and calibration data, not once per site
            slot["disk_key"] = self.decomposition_cache_key(ctx)
        task_key = slot["disk_key"]
        if task_key is None or getattr(ctx, "cache_dir", None) is None:
            return None
        method = json.dumps([*factorization.identity, _source_hash(type(factorization)),
                             _source_hash(CompressionTask), device.type, str(dtype)])
        method_key = hashlib.sha256(method.encode()).hexdigest()[:20]
        site = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        return Path(ctx.cache_dir) / "decompositions" / task_key[:24] / method_key / f"{site}.pt"


@functools.lru_cache(maxsize=None)
def _source_hash(cls: type) -> str:
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(cls)).read_bytes()).hexdigest()[:16]
    except (OSError, TypeError):
        return "unknown"


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_decomposition(path: Path, result: Decomposition) -> bool:
    """Save a decomposition atomically, and then its file's SHA-256 beside it (``<site>.pt.sha256``); False when it
    could not be written (a full disk only costs the cache). ``left`` is stored transposed (p x out, like
    ``right``), so that the leading k components of both factors are contiguous on disk."""
    import torch
    payload = {"left_t": result.left.T.contiguous().cpu(), "s": result.s.cpu(), "right": result.right.contiguous().cpu(),
               "note": result.note}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    try:
        atomic_write(path, data)
        atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest())
    except OSError:
        return False
    return True


def read_decomposition(path: Path, device: torch.device, verify: bool = True) -> Decomposition | None:
    """The decomposition at ``path`` if it exists and its file matches its recorded SHA-256 (``verify``); else None.

    The factors stay in the file (``MappedDecomposition``); the spectrum is loaded onto ``device``.
    """
    import torch
    digest = path.with_name(path.name + ".sha256")
    if not path.is_file() or not digest.is_file():
        return None
    try:
        if verify and _file_digest(path) != digest.read_text().strip():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        s, note = payload["s"].to(device, copy=True), str(payload.get("note") or "")
        shapes = (payload["left_t"].shape[0], payload["right"].shape[0], s.shape[0])
    except Exception:  # truncated, foreign or unpicklable: recompute and replace
        return None
    if len(set(shapes)) != 1:
        return None
    return MappedDecomposition(path, s, note)


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
    decompositions = task.decompositions(ctx, factorization)
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
    with swapped(model, sites, factorization, decompositions, ranks, compensation_statistics(task, ctx, factorization)
                 ) as chosen:
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
        """The mean calibration loss with ``ranks``' sites compressed. Where the task names its blocks
        (``site_blocks``), the blocks before the first one holding a compressed site are not run: they compute what
        the dense model computes, so their recorded outputs are replayed (``PrefixReplay``) -- the same loss, for
        the cost of the blocks from that one on (about half a forward pass on average over a model's sites)."""
        import torch
        task, ctx = self.task, self.ctx
        model = task.model(ctx)
        sites = self._sites(ranks)
        decompositions = {name: task.decomposition(ctx, self.factorization, name) for name in sites}
        count_work(ctx, "calibration_evaluations")
        statistics = compensation_statistics(task, ctx, self.factorization)
        batches = list(_first(task.calibration_batches(ctx), max_batches))
        replay = PrefixReplay.of(task, ctx, batches, max_batches)
        losses = []
        with swapped(model, sites, self.factorization, decompositions, ranks, statistics), torch.no_grad():
            with replay.skipping(ctx, model, sites) as cursor:
                for index, batch in enumerate(batches):
                    cursor.batch = index
                    losses.append(float(task.calibration_loss(model, batch)))
        if not losses:
            raise ValueError("the task yielded no calibration batches")
        return sum(losses) / len(losses)


class PrefixReplay:
    """The dense model's output of every block (``site_blocks``) for the first calibration batches, recorded once
    per calibration key and batch count, so an evaluation that compresses only sites of blocks i, i+1, ... replays
    blocks 0..i-1 instead of running them (``skipping``). Exact: those blocks are dense and see the same inputs, so
    their outputs are the recorded ones (the last replayed output is handed out as a copy, so nothing downstream can
    modify the record). Not offered (``skipping`` runs everything) when the task names no blocks or when the record
    would exceed ``MEMORY_LIMIT`` bytes (batches x blocks x the residual stream: 18 MB for SmolLM2-135M's 30 blocks and
    one 256-token window; 270 MB for a 1B Llama's 16 blocks and eight such windows). Counter ``replayed_blocks``."""

    MEMORY_LIMIT = 2 * 1024**3

    def __init__(self, blocks: list[str] | None, outputs: list[list] | None):
        self.blocks, self.outputs = blocks, outputs  # outputs[block][batch]
        self.batch = 0

    @classmethod
    def of(cls, task: CompressionTask, ctx, batches: list, max_batches: int | None) -> PrefixReplay:
        """The record for these batches, computed on first use (a forward pass of the dense model) and memoised."""
        slot = task.calibration_memo(ctx).setdefault("prefix_replay", {})
        if max_batches not in slot:
            blocks = task.site_blocks(task.model(ctx))
            outputs = None
            if blocks and len(blocks) > 1:
                task._check_dense(ctx, "recording block outputs")
                outputs = _record_block_outputs(task, task.model(ctx), blocks[:-1], batches, cls.MEMORY_LIMIT)
            slot[max_batches] = cls(blocks if outputs is not None else None, outputs)
        return slot[max_batches]

    def first_block(self, sites: Iterable[str]) -> int:
        """Index of the first block holding one of ``sites`` (0: nothing to skip, also for a site in no block)."""
        if self.blocks is None:
            return 0
        first = len(self.blocks)
        for site in sites:
            index = next((i for i, b in enumerate(self.blocks) if site.startswith(b + ".")), 0)
            first = min(first, index)
        return min(first, len(self.outputs))

    @contextlib.contextmanager
    def skipping(self, ctx, model: nn.Module, sites: Iterable[str]):
        """Blocks before the first one holding ``sites`` replaced by their recorded outputs (for batch
        ``cursor.batch``), put back on exit; counted in ``ctx``. Yields the cursor (this object)."""
        from rankbench.kinds.layers import ReplayedBlock

        first = self.first_block(sites)
        originals = {name: model.get_submodule(name) for name in (self.blocks or [])[:first]}
        try:
            for index, name in enumerate(originals):
                model.set_submodule(name, ReplayedBlock(functools.partial(self._output, index, index == first - 1)))
            if first:
                count_work(ctx, "replayed_blocks", first)
            yield self
        finally:
            for name, module in originals.items():
                model.set_submodule(name, module)


    def _output(self, index: int, last: bool):
        """Block ``index``'s recorded output for the current batch (a copy for the last replayed block, whose output
        the first running block reads: nothing downstream can then modify the record)."""
        recorded = self.outputs[index][self.batch]
        return _detached(recorded, clone=True) if last else recorded


def _record_block_outputs(task: CompressionTask, model: nn.Module, blocks: list[str], batches: list,
                          limit: int) -> list[list] | None:
    """Per block, per batch: the block's output in a dense forward of each batch (None past ``limit`` bytes)."""
    import torch

    outputs: list[list] = [[] for _ in blocks]
    size = [0]

    def recorder(index: int):
        def hook(module, args, output):
            kept = _detached(output)
            outputs[index].append(kept)
            size[0] += sum(t.numel() * t.element_size() for t in _tensors(kept))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(recorder(i)) for i, name in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                task.calibration_loss(model, batch)
                if size[0] > limit:
                    return None
    finally:
        for handle in handles:
            handle.remove()
    if any(len(per_block) != len(batches) for per_block in outputs):
        return None  # a block ran more or less than once per batch: not a sequential stack
    return outputs


def _detached(value, clone: bool = False):
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if clone else value
    if isinstance(value, tuple):
        return type(value)(*(_detached(v, clone) for v in value)) if hasattr(value, "_fields") else tuple(
            _detached(v, clone) for v in value)
    if isinstance(value, list):
        return [_detached(v, clone) for v in value]
    return value


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def compensation_statistics(task: CompressionTask, ctx, factorization: LowRankFactorization
                            ) -> dict[str, SiteStatistics] | None:
    """The statistics a factorization's ``compensation`` fits from (its ``needs``); None for a factorization
    without one (its decompositions may have been streamed: nothing asks for every site's statistics at once)."""
    if type(factorization).compensation is LowRankFactorization.compensation:
        return None
    return task.statistics(ctx, factorization.needs)


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


INPUT_KINDS = frozenset({"gram", "input_abs_mean"})  # statistics of a site's inputs: forward hooks only
GRADIENT_KINDS = frozenset({"fisher_rows", "fisher_cols", "weight_grad"})  # need the calibration loss's gradient


class InputStatistics:
    """Forward hooks accumulating, in float64, XᵀX (``gram``) and Σ|x| (``input_abs_mean``) of the inputs of some
    sites (all leading dimensions are tokens).

    Sites fed the *same* input tensor in a forward pass -- a transformer's q/k/v projections, gate/up -- share one
    accumulator (the tensor's identity, seen through a weak reference, decides on the first batch), so their Gram
    matrix is computed and held once and their ``SiteStatistics`` hold the same tensor: 4 Gram matrices per Llama
    layer instead of 7. The numbers are those of separate accumulators (the same inputs, summed in the same order).
    """

    def __init__(self, sites: dict[str, nn.Linear], kinds: Iterable[str]):
        self.sites, self.kinds = sites, INPUT_KINDS & set(kinds)
        self.owner: dict[str, str] = {}  # site -> the site whose accumulator it shares (itself for the first one)
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts: dict[str, int] = {}
        self._seen: dict[str, Any] = {}  # site -> weak reference to its latest input
        self._handles: list = []

    def __enter__(self) -> InputStatistics:
        if self.kinds:
            self._handles = [linear.register_forward_hook(self._hook(name)) for name, linear in self.sites.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        import weakref

        import torch

        def record(module, inputs, output):
            x_in = inputs[0]
            if name not in self.owner:
                self.owner[name] = next(
                    (other for other, ref in self._seen.items() if ref() is x_in and self.owner[other] == other), name
                )
                self._seen[name] = weakref.ref(x_in)
            if self.owner[name] != name:
                return
            self._seen[name] = weakref.ref(x_in)
            x = x_in.detach().reshape(-1, x_in.shape[-1]).to(torch.float64)
            acc = self.sums.setdefault(name, {})
            if "gram" in self.kinds:
                acc["gram"] = acc["gram"].addmm_(x.T, x) if "gram" in acc else x.T @ x
            if "input_abs_mean" in self.kinds:
                acc["abs"] = acc.get("abs", 0) + x.abs().sum(dim=0)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return record

    def fill(self, store: dict[str, SiteStatistics]) -> None:
        """Write the accumulated statistics into ``store[site]`` (zeros for a site no input reached)."""
        import torch

        for name, linear in self.sites.items():
            owner = self.owner.get(name, name)
            acc, stats = self.sums.get(owner, {}), store.setdefault(name, SiteStatistics())
            in_features = linear.weight.shape[1]
            zeros = {"dtype": torch.float64, "device": linear.weight.device}
            if "gram" in self.kinds:
                stats.gram = acc.get("gram", torch.zeros(in_features, in_features, **zeros))
            if "input_abs_mean" in self.kinds:
                stats.input_abs_mean = acc.get("abs", torch.zeros(in_features, **zeros)) / max(self.counts.get(owner, 0), 1)
            if self.kinds:
                stats.tokens = self.counts.get(owner, 0)


def collect_statistics(task: CompressionTask, ctx, model: nn.Module, kinds: set[str], store: dict) -> None:
    """One calibration pass over ``task.calibration_batches(ctx)``, filling ``store[site]`` for ``kinds``.

    Input statistics (``gram``, ``input_abs_mean``) come from ``InputStatistics``' forward hooks. With
    ``fisher_rows``/``fisher_cols``/``weight_grad`` each batch's loss is also differentiated with respect to the
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
    need_grads = bool(kinds & GRADIENT_KINDS)
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in sites}
    site_params = [linear.weight for linear in sites.values()]
    site_ids = {id(p) for p in site_params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in site_ids] if need_grads else []
    flags = [p.requires_grad for p in site_params]
    batches = 0
    inputs = InputStatistics(sites, kinds)
    try:
        for p in site_params:
            p.requires_grad_(need_grads)
        for p in others:
            p.requires_grad_(False)
        with inputs:
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
        for p, flag in zip(site_params, flags):
            p.requires_grad_(flag)
        for p in others:
            p.requires_grad_(True)
    if batches == 0:
        raise ValueError("the task yielded no calibration batches")
    inputs.fill(store)
    for name in sites:
        acc, stats = sums[name], store[name]
        if "fisher_rows" in kinds:
            stats.fisher_rows = acc["fisher"] / batches
        if "fisher_cols" in kinds:
            stats.fisher_cols = acc["fisher_cols"] / batches
        if "weight_grad" in kinds:
            stats.weight_grad = acc["grad"] / batches


class _BlockInputs(Exception):
    """Raised by the pre-hook on the last block once every block's call arguments of a batch are recorded."""


def streamed_input_statistics(task: CompressionTask, ctx, model: nn.Module, blocks: list[str],
                              sites: dict[str, nn.Linear], kinds: Iterable[str]
                              ) -> Iterator[tuple[str, dict[str, SiteStatistics]]]:
    """Input statistics (``INPUT_KINDS``) of ``sites`` block by block: yields (block, {site: SiteStatistics}) for each
    of ``blocks`` (qualified names of the model's sequential blocks, in order) holding sites, computing only that
    block's statistics, which the caller uses and drops before the next block is computed.

    The calibration batches run through the model once with pre-hooks recording every block's call arguments (the
    first block's input, and each block's other positional and keyword arguments: attention masks, rotary position
    embeddings -- references, no copies); then each block runs alone on the previous block's outputs for every batch
    (the residual stream of all calibration batches, batches x tokens x hidden, is the only thing carried between
    blocks). The dense blocks compute exactly what the whole model computes, so the statistics equal those of one
    whole pass (``collect_statistics``) -- the cost is one extra forward pass of the calibration batches.
    """
    import torch

    modules = [model.get_submodule(name) for name in blocks]
    per_block = {name: {site: linear for site, linear in sites.items() if site.startswith(name + ".")}
                 for name in blocks}
    calls: list[list[tuple[tuple, dict]]] = []  # per batch: per block (args, kwargs)
    hidden: list[torch.Tensor] = []  # per batch: the residual stream entering the current block

    def recorder(index: int):
        def pre_hook(module, args, kwargs):
            calls[-1].append((args[1:], kwargs))
            if index == 0:
                hidden.append(args[0])
            if index == len(modules) - 1:
                raise _BlockInputs
        return pre_hook

    handles = [module.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in task.calibration_batches(ctx):
                calls.append([])
                try:
                    task.calibration_loss(model, batch)
                except _BlockInputs:
                    pass
                if len(calls[-1]) != len(modules):
                    raise RuntimeError(
                        f"task {task.name!r}: a calibration batch reached {len(calls[-1])} of the {len(modules)} "
                        "blocks in order; site_blocks must name the model's sequential blocks"
                    )
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        raise ValueError("the task yielded no calibration batches")
    for index, (name, module) in enumerate(zip(blocks, modules)):
        block_sites = per_block[name]
        inputs = InputStatistics(block_sites, kinds)
        last = index == len(modules) - 1 or not any(per_block[later] for later in blocks[index + 1:])
        with inputs, torch.no_grad():
            for b, batch_calls in enumerate(calls):
                args, kwargs = batch_calls[index]
                out = module(hidden[b], *args, **kwargs)
                if not last:
                    hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
        if block_sites:
            store: dict[str, SiteStatistics] = {}
            inputs.fill(store)
            yield name, store
        if last:
            break


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
