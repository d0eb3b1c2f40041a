"""The contracts between the host and its plugins.

Every plugin -- built-in or third-party -- is a class derived from one of the bases below and handed to the host
through a pluggy hook (see ``rankbench.hookspecs``). The host only ever talks to these bases; it knows no task or
method by name.

Roles
-----
``Task``           owns a model or target, its data, its metrics and its *sites* (the weights, or the unknown
                   matrix/tensor, that low-rank methods act on). It supplies the *capabilities* of the problem kinds
                   it speaks (``rankbench.kinds``: ``CompressionTask``, ``AdaptationTask``, ``TrainingTask``,
                   ``RecoveryTask``); each cell runs through its kind's protocol (``rankbench.kinds.PROTOCOLS``),
                   chosen when the suite is expanded. A task of a kind of its own is a ``SelfRunningTask``.
``Selector``       decides a rank per site (or per mode) under a budget, or by itself (budget-free).
``Factorization``  how a site is represented and fitted at a given rank (SVD variants, LoRA, CP/Tucker/TT, and for
                   matrix recovery the solvers). The protocol between a task and its factorizations depends on the
                   task's *problem kind*; protocols live in ``rankbench.kinds``.
``Executor``       where cells run (in-process, isolated subprocess, SLURM jobs via submitit, Ray tasks).

Pairing: every method declares the problem kinds it can handle (``problem_kinds``) and the budget kinds it
understands; a mismatch -- or a reason returned by any plugin's ``skip`` -- turns a cell into a ``skipped`` cell
with that reason (benchopt's ``skip()`` idea).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from rankbench.hookspecs import hookimpl  # noqa: F401 -- its home is beside the specs; re-exported for plugins

if TYPE_CHECKING:  # pragma: no cover
    from rankbench.cells import Cell
    from rankbench.context import CellContext

# Budget kinds (README, "Suites"): what the suite's ``budgets`` numbers mean.
PARAM_RATIO = "param_ratio"  # parameters kept / dense parameters of the targeted sites
RANK_TOTAL = "rank_total"  # total rank summed over sites
RANK_CAP = "rank_cap"  # the same maximal rank for every site

# Problem kinds: which protocol a task speaks with its methods.
COMPRESSION = "compression"
ADAPTATION = "adaptation"
TRAINING = "training"
RECOVERY = "recovery"


class PluginParams(BaseModel):
    """Base for a plugin's parameters. Unknown keys are errors, so a typo in a suite is caught by ``bench check``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Plugin(ABC):
    """What every plugin class has. ``version`` is folded into cell ids together with a hash of the plugin's file.

    The bases below are abstract base classes: a method marked ``@abstractmethod`` is one a plugin must implement,
    and the host refuses to register a class that leaves one unimplemented (a load failure naming the methods).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[PluginParams]] = PluginParams
    description: ClassVar[str] = ""

    def __init__(self, params: PluginParams | None = None):
        self.params = params if params is not None else self.Params()

    def __repr__(self) -> str:
        return f"{self.name}[{self.params.model_dump_json()}]"

    @property
    def identity(self) -> tuple[str, str]:
        """(name, parameters as canonical JSON): what memoised work done by or for this plugin is keyed on."""
        return self.name, self.params.model_dump_json()


class Task(Plugin):
    kind: ClassVar[str] = "task"
    problem_kind: ClassVar[str]
    budget_kind: ClassVar[str | None]  # how the suite's budgets are read for this task (None: budget-free task)
    primary_metric: str  # the quality metric the report puts first (a property where it depends on parameters)
    # Whether a GPU can pay off for this task. ``device: auto`` (the default) runs the cells of a task that says
    # False on the CPU even where torch sees a GPU: problems this small spend more time launching kernels and
    # synchronising than computing (``rankbench.envinfo.task_device``). An explicit ``--device cuda`` / ``device: cuda``
    # is always honoured. A property where it depends on parameters (read from the configured instance).
    gpu_benefit: ClassVar[bool] = True

    @property
    def problem_kinds(self) -> frozenset[str]:
        """Every protocol this task speaks. A cell runs when the task, its selector and its factorization share at
        least one kind; ``problem_kind`` is the task's main one (a training task also compresses its dense model)."""
        return frozenset({self.problem_kind})

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        """Configurations small enough for conformance checks (``bench test-plugin``): one per problem kind the task
        offers (the kinds are read from the configured instance's ``problem_kinds``), each running a cell in seconds
        on one CPU core without downloads. ``bench test-plugin`` exercises other plugins on these. Empty: the task
        offers none (its plugins are then not exercised on it)."""
        return []

    def skip(self, selector: Selector, factorization: Factorization) -> str | None:
        """Reason why this task cannot run the pair, or None."""
        return None

    def setup(self, ctx: CellContext) -> None:
        """Expensive work shared by all cells of one task configuration (and seed: ``ctx.task_seed``).

        Called before every cell, before the protocol's own set-up; implementations memoise with ``ctx.memo`` so that
        the work happens once per task configuration and process. Time spent here is recorded as phase ``setup``.
        """


class SelfRunningTask(Task):
    """A task that runs its cells itself instead of through a protocol of ``rankbench.kinds``: a problem kind of its
    own, or an experiment that does not fit the built-in kinds. Its cells are dispatched to these two methods."""

    @abstractmethod
    def run_reference(self, ctx: CellContext) -> None:
        """Measure the uncompressed model (selector ``none``, factorization ``dense``): the baseline row."""

    @abstractmethod
    def run(self, ctx: CellContext, selector: Selector, factorization: Factorization) -> None:
        """Run one cell: select ranks, factorize/solve, evaluate. Report through ``ctx.metric``/``ctx.ranks``."""


@dataclasses.dataclass
class Site:
    """One weight (or unknown matrix/tensor) that a low-rank method acts on.

    ``singular_values`` are descending, of the matrix a spectral selector should look at (the weight, or for a
    recovery problem the back-projected observations). Tensor sites give ``mode_singular_values`` (one spectrum
    per rank slot) and selectors answer with one rank per slot. A slot is a mode unfolding of ``shape`` unless the
    site says otherwise: ``rank_dims`` gives the (rows, cols) of the matrix behind each slot (e.g. the sequential
    unfoldings of a tensor train) and ``rank_caps`` each slot's largest rank; ``params_at_ranks`` prices a tuple of
    slot ranks exactly (without it a tuple is charged ``params_at_rank(max(ranks))``).
    """

    name: str
    shape: tuple[int, ...]
    singular_values: np.ndarray | None = None
    mode_singular_values: Sequence[np.ndarray] | None = None
    noise_sigma: float | None = None  # known per-entry noise std, where the task knows it
    params_at_rank: Callable[[int], int] | None = None  # parameters stored by the factorized site at rank k
    params_at_ranks: Callable[[tuple[int, ...]], int] | None = None  # ... at per-slot ranks (tensor sites)
    rank_dims: Sequence[tuple[int, int]] | None = None  # (rows, cols) behind each rank slot (tensor sites)
    rank_caps: Sequence[int] | None = None  # largest rank of each slot (tensor sites)
    dense_params: int | None = None
    max_rank: int | None = None
    # The observed data itself, for selectors that fit a model (ARD): an array and a boolean mask of observed entries.
    data: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.dense_params is None:
            self.dense_params = int(np.prod(self.shape))
        if self.max_rank is None:
            self.max_rank = int(min(self.shape))
        if self.params_at_rank is None and len(self.shape) == 2:
            m, n = self.shape
            self.params_at_rank = lambda k, m=m, n=n: int(k) * (m + n)


class NoStatistics:
    """The ``RankProblem.stats`` of a problem whose kind offers selectors nothing beyond the sites."""

    def __getattr__(self, name: str) -> Any:
        raise KeyError(f"this task offers no statistic {name!r}")


@dataclasses.dataclass
class RankProblem:
    """What a selector sees: the sites, the budget, and the statistics its problem kind offers (``stats``: an object
    with methods, e.g. ``rankbench.kinds.compression.CompressionStatistics``; ``NoStatistics`` where there are none)."""

    sites: list[Site]
    budget: float | None
    budget_kind: str | None
    seed: int
    stats: Any = dataclasses.field(default_factory=NoStatistics)
    device: str = "cpu"  # where a selector that computes (e.g. ARD's variational fit) should run

    @property
    def dense_params(self) -> int:
        return int(sum(s.dense_params for s in self.sites))


Ranks = Mapping[str, int | tuple[int, ...]]


class Selector(Plugin):
    kind: ClassVar[str] = "selector"
    # By default a selector reads only ``Site.singular_values`` (and shapes, costs), which every kind provides.
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION, RECOVERY, ADAPTATION})
    budget_kinds: ClassVar[frozenset[str | None]] = frozenset({PARAM_RATIO, RANK_CAP, RANK_TOTAL, None})

    def uses_budget(self, budget_kind: str | None) -> bool:
        """False for selectors that determine ranks by themselves: the host then runs them once, budget null."""
        return True

    def skip(self, task: Task, factorization: Factorization) -> str | None:
        return None

    @abstractmethod
    def select(self, problem: RankProblem) -> Ranks:
        """A rank for every site of ``problem`` (for a tensor site a tuple, one rank per rank slot), within the
        budget where the selector uses it."""


class Factorization(Plugin):
    """How a site is represented and fitted at a given rank. Nothing is abstract here: what a factorization
    implements depends on the problem kinds it declares, and each kind's protocol is a base class in
    ``rankbench.kinds`` that a factorization derives from, and that says what it must implement:
    ``compression.LowRankFactorization`` and ``tensor_compression.TensorFactorization`` (compression; the tensor
    formats also serve as layer formats of the training kind), ``adaptation.AdapterFactorization`` (adaptation),
    ``recovery.RecoverySolver`` (recovery)."""

    kind: ClassVar[str] = "factorization"
    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})

    def skip(self, task: Task, selector: Selector) -> str | None:
        return None


@dataclasses.dataclass
class CellRecord:
    """What running one cell produced; the executor hands it back to the host, which writes it atomically."""

    cell_id: str
    status: str
    reason: str = ""
    traceback: str = ""
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ranks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    curves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    started_at: str = ""
    wall_s: float = 0.0
    primary_metric: str = ""
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


class Executor(Plugin):
    """Runs cells somewhere and yields one ``CellRecord`` per cell, in any order.

    ``runtime`` (``rankbench.runner.Runtime``) carries the device, the per-cell timeout, the plugin settings a
    worker needs to rebuild the plugin manager, and ``execute(cell)`` for running a cell in the current process.
    An executor must never raise because a cell failed: failures are records.
    """

    kind: ClassVar[str] = "executor"
    # True where the executor's jobs write their cells' part files themselves (``runtime.results_dir``): the host then
    # acknowledges records already on disk instead of writing them again
    jobs_write_results: ClassVar[bool] = False
    # True for the executor that runs cells when neither ``--executor`` nor the suite names one; exactly one
    # registered executor may claim it (the host names none itself)
    default: ClassVar[bool] = False
    # True where ``run`` runs every cell in the calling process (``runtime.execute``): ``bench test-plugin`` runs its
    # tiny cells, and the cells an executor under test is compared with, through such an executor
    in_process: ClassVar[bool] = False

    @abstractmethod
    def run(self, cells: Sequence[Cell], runtime: Any) -> Iterator[CellRecord]:
        """Run ``cells`` and yield one record per cell as each ends, in any order."""


class CellFailure(Exception):
    """Raised by a plugin to end a cell with a given status (``diverged``, ``oom``, ``error``) and reason."""

    status = "error"


class Diverged(CellFailure):
    status = "diverged"


class SkipCell(CellFailure):
    """Raised inside a cell when a pair turns out to be incompatible only once data is seen."""

    status = "skipped"


STATUSES = ("ok", "skipped", "error", "timeout", "crashed", "diverged", "oom")
FINAL_STATUSES = frozenset({"ok", "skipped"})  # not re-run on resume; the others are retried


def lazy_attributes(owner: str, source: str, names) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) for module ``owner`` that serves ``names`` from module ``source``,
    imported on first access: a light module (a plugin, a kind) keeps names whose home imports torch reachable
    without importing torch itself. Use as ``__getattr__ = lazy_attributes(__name__, "pkg._layers", {...})``."""
    served = frozenset(names)

    def __getattr__(name: str):
        if name in served:
            return getattr(importlib.import_module(source), name)
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")

    return __getattr__
