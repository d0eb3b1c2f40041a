"""Conformance checks for one plugin (``bench test-plugin NAME``): the checks every built-in passes, so a third party
knows that a plugin is well behaved before publishing it.

Checks, in order (one row each in the report; a row's verdict is ``pass``, ``FAIL``, ``warn``, ``not exercised`` or
``n/a``; only ``FAIL`` makes the command exit 1):

``loads``          the plugin is in the registry and its module (entry point or ``--plugins-dir`` file) is not among
                   the load failures; a name that only matches a load failure fails here, with the failure text.
``parameters``     ``Params`` is a ``PluginParams`` subclass that builds with no arguments (else: which fields lack
                   a default), survives a JSON round trip (cells store parameters as JSON), and the plugin builds
                   from it; ``name``, ``version`` and ``description`` are set; a selector/factorization declares at
                   least one problem kind. Fields without a ``description`` and ``Params`` that accept unknown keys
                   are a ``warn`` (many useful fields are self-explanatory; a suite still validates).
``configurations`` (tasks) ``Task.conformance_params()`` returns parameter dicts that validate; empty is a ``warn``.
``runs``           one tiny cell per problem kind the plugin claims, run by the real runner (``run_cells``) in a
                   temporary folder, one seed, in this process (through the registered executor that declares
                   ``in_process``, the built-in ``inprocess``; without one no cell runs and this check fails), must
                   end ``ok``. A kind no tiny problem can exercise is ``not exercised``; a plugin none of whose
                   kinds can be exercised fails.
``budget``         every ``ok`` cell with a budget respects it: ``param_ratio`` <= budget (+1e-9), the sum of the
                   ranks (metric ``rank_total`` or the ranks table) <= budget for ``rank_total``, every site's rank
                   (each mode's for tensor sites, else metric ``rank_selected``) <= budget for ``rank_cap``.
``deterministic``  the same cells run a second time (fresh output folder, fresh cache folder, fresh process state)
                   give the same metrics (relative tolerance 1e-9) and ranks; time and memory metrics (the kinds
                   ``bench compare`` gives them: ``time_*_s``, ``wall_s``, ``latency*``, ``peak_*``, units s/ms/MiB)
                   are not compared.
``agrees``         (executors) the tiny cells run through the executor end with the same statuses and quality
                   metrics (those with a direction, ``higher_is_better`` set, plus ``params``/``param_ratio``) as
                   the same cells run in this process.

Tiny problems come from the tasks themselves, never from a list here: every task may offer
``Task.conformance_params()``, one small configuration per problem kind; the kinds a configuration speaks are read
from the configured task's ``problem_kinds``. For a selector (factorization) and a kind K, the first configuration
speaking K -- built-in tasks first, configurations whose main ``problem_kind`` is K first -- for which some
factorization (selector) pairs with it (``pairing_skip_reason`` finds no reason, and K is a kind all three share)
is used; partners are tried built-ins first, selectors that use the budget first (so the budget check means
something), the simplest first (fewest parameters: the least that can go wrong on the partner's side), broader
plugins (more problem kinds) first, then by name. A task runs its reference cell and one cell per kind of each of its configurations.
An executor runs the reference and one pair cell of the first configuration that has a pair. Budgets: one per
budget kind (``BUDGETS``); a selector that determines ranks by itself runs with budget null.

The checks are deliberately cheap: one configuration per kind, one seed, one budget, each cell twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rankbench.api import PARAM_RATIO, RANK_CAP, RANK_TOTAL, Executor, PluginParams
from rankbench.cells import Cell, make_cell
from rankbench.compare import metric_kind
from rankbench.kinds import cell_kind
from rankbench.plugins import KINDS, LoadFailure, PluginInfo, Registry, load_plugins
from rankbench.suite import PluginSpec, SuiteError, pairing_skip_reason, resolve_ref

BUILTIN_DISTRIBUTION = "rankbench"  # the host's own distribution: its plugins are the preferred partners
SUITE = "conformance"
SEED = 0
BUDGETS: dict[str, float] = {PARAM_RATIO: 0.8, RANK_TOTAL: 8.0, RANK_CAP: 3.0}  # feasible on tiny nets
BUDGET_SLACK = 1e-9
REL_TOL, ABS_TOL = 1e-9, 1e-12
CELL_TIMEOUT = 300.0  # seconds per tiny cell
THREADS = 1  # torch CPU threads for tiny cells: more only wait on each other (5x slower on a busy 2-core machine)

PASS, FAIL, WARN, NOT_EXERCISED, NA = "pass", "FAIL", "warn", "not exercised", "n/a"

_CONTRACT_SIZE_METRICS = ("params", "param_ratio")


class ConformanceInputError(Exception):
    """Bad input to ``bench test-plugin`` (unknown or ambiguous name): the CLI exits 2 with this message."""


@dataclasses.dataclass
class Check:
    check: str
    scope: str
    verdict: str
    detail: str = ""


@dataclasses.dataclass
class Report:
    name: str
    kind: str
    checks: list[Check] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, check: str, scope: str, verdict: str, detail: str = "") -> Check:
        row = Check(check, scope, verdict, detail)
        self.checks.append(row)
        return row

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failed

    def rows(self) -> list[list[str]]:
        return [[c.check, c.scope, c.verdict, c.detail] for c in self.checks]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for c in self.checks:
            counts[c.verdict] = counts.get(c.verdict, 0) + 1
        tally = ", ".join(f"{n} {v}" for v, n in counts.items())
        if self.passed:
            return f"{self.name} ({self.kind}): conforms ({tally}) in {self.seconds:.1f} s"
        failed = ", ".join(dict.fromkeys(c.check for c in self.failed))
        return f"{self.name} ({self.kind}): FAILED {failed} ({tally}) in {self.seconds:.1f} s"


# ---------------------------------------------------------------------------------------------------------------------
# Finding the plugin


def _failure_names(failure: LoadFailure) -> set[str]:
    names = {failure.plugin}
    if failure.plugin.endswith(".py"):
        names.add(failure.plugin[:-3])
    return names


def _source_name(info: PluginInfo) -> str:
    """The pluggy plugin (entry point name or plugin-file stem) that registered ``info``."""
    if " = " in info.source:
        return info.source.split(" = ", 1)[0]
    return Path(info.source).stem


def find_plugin(registry: Registry, name: str, kind: str | None) -> tuple[str, PluginInfo | None, list[LoadFailure]]:
    """(kind, info or None, matching load failures). Raises ``ConformanceInputError`` for an unknown or ambiguous
    name, with the close matches."""
    kinds = [kind] if kind else list(KINDS)
    found = [(k, registry.plugins[k][name]) for k in kinds if name in registry.plugins[k]]
    failures = [f for f in registry.failures if name in _failure_names(f)]
    if len(found) > 1:
        listed = " and ".join(f"a {k}" for k, _ in found)
        raise ConformanceInputError(f"{name!r} names {listed}; choose one with --kind")
    if found:
        k, info = found[0]
        source = _source_name(info)
        failures += [f for f in registry.failures if source in _failure_names(f) and f not in failures]
        return k, info, failures
    if failures:
        return kind or "plugin", None, failures
    elsewhere = [k for k in KINDS if k not in kinds and name in registry.plugins[k]]
    if elsewhere:
        raise ConformanceInputError(f"{name!r} is not a {kind} but a {' and a '.join(elsewhere)}; drop --kind")
    known = sorted({n for k in kinds for n in registry.plugins[k]})
    candidates = known + sorted({n for f in registry.failures for n in _failure_names(f)})
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    what = f"{kind} " if kind else "plugin "
    hint = f"did you mean: {', '.join(close)}?" if close else f"known: {', '.join(known) or 'none loaded'}"
    raise ConformanceInputError(f"unknown {what}{name!r}; {hint}")


# ---------------------------------------------------------------------------------------------------------------------
# Declarations


def _builtin(info: PluginInfo) -> bool:
    return info.distribution == BUILTIN_DISTRIBUTION


def check_declarations(report: Report, info: PluginInfo) -> PluginSpec | None:
    """The ``parameters`` row(s); returns the plugin built with its default parameters, or None."""
    cls, problems, warnings = info.cls, [], []
    for attr in ("name", "version", "description"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"`{attr}` is not set")
    spec = None
    params_cls = getattr(cls, "Params", None)
    if not (isinstance(params_cls, type) and issubclass(params_cls, PluginParams)):
        problems.append(f"Params ({params_cls!r}) is not a subclass of rankbench.PluginParams")
    else:
        fields = params_cls.model_fields
        required = [n for n, f in fields.items() if f.is_required()]
        if required:
            problems.append(f"Params fields without a default: {', '.join(required)}")
        else:
            try:
                spec = resolve_ref(registry_stub(info), info.kind, info.name, "defaults", "Params")
            except SuiteError as exc:
                problems.append(f"cannot build with default parameters: {exc.message}")
            except Exception as exc:  # a validator or __init__ that raises something else
                problems.append(f"cannot build with default parameters: {type(exc).__name__}: {exc}")
        if spec is not None:
            try:
                again = params_cls.model_validate(spec.params)
                if again.model_dump(mode="json") != spec.params:
                    problems.append("Params do not survive a JSON round trip (cells store parameters as JSON)")
            except Exception as exc:
                problems.append(f"Params do not survive a JSON round trip: {type(exc).__name__}: {exc}")
        undocumented = [n for n, f in fields.items() if not f.description]
        if undocumented:
            warnings.append(f"fields without a description: {', '.join(undocumented)}")
        if params_cls.model_config.get("extra") != "forbid":
            warnings.append("Params accept unknown keys (a typo in a suite is not caught)")
    if spec is not None and info.kind in ("selector", "factorization"):
        kinds = getattr(spec.instance, "problem_kinds", None)
        if not kinds:
            problems.append("declares no problem_kinds")
    fields_note = ""
    if isinstance(params_cls, type) and issubclass(params_cls, PluginParams):
        fields_note = f"{len(params_cls.model_fields)} parameter(s)"
    if problems:
        report.add("parameters", "-", FAIL, "; ".join(problems))
    else:
        report.add("parameters", "-", PASS, f"{fields_note}, default-constructible, JSON round trip")
    if warnings:
        report.add("parameters", "-", WARN, "; ".join(warnings))
    return spec if not problems else None


def registry_stub(info: PluginInfo) -> Registry:
    """A registry holding just ``info`` (``resolve_ref`` looks plugins up by kind and name)."""
    registry = Registry()
    registry.plugins[info.kind][info.name] = info
    return registry


# ---------------------------------------------------------------------------------------------------------------------
# Tiny problems and partners


@dataclasses.dataclass
class TaskConfig:
    spec: PluginSpec
    index: int  # position in the task's conformance_params()
    builtin: bool

    @property
    def label(self) -> str:
        return f"{self.spec.name}[{self.index}]"

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.spec.instance.problem_kinds)

    @property
    def main_kind(self) -> str:
        return self.spec.instance.problem_kind


@dataclasses.dataclass
class Exercise:
    """One tiny cell to run: a kind of a task configuration with a selector and a factorization (None: the
    reference cell)."""

    kind: str
    config: TaskConfig
    selector: PluginSpec | None = None
    factorization: PluginSpec | None = None
    cells: list[Cell] = dataclasses.field(default_factory=list)

    @property
    def scope(self) -> str:
        return f"{self.kind} on {self.config.label}"

    def partner_text(self, subject_kind: str) -> str:
        if self.selector is None:
            return "reference cell"
        parts = []
        if subject_kind != "selector":
            parts.append(f"selector {self.selector.name}")
        if subject_kind != "factorization":
            parts.append(f"factorization {self.factorization.name}")
        return "with " + " + ".join(parts)


def task_configs(registry: Registry, only: str | None = None) -> tuple[list[TaskConfig], list[str]]:
    """Every valid conformance configuration (built-in tasks first), and the problems met on the way."""
    infos = [i for i in registry.plugins["task"].values() if only is None or i.name == only]
    infos.sort(key=lambda i: (not _builtin(i), i.name))
    configs, problems = [], []
    for info in infos:
        try:
            entries = info.cls.conformance_params()
        except Exception as exc:
            problems.append(f"{info.name}.conformance_params() raised {type(exc).__name__}: {exc}")
            continue
        if not isinstance(entries, (list, tuple)):
            problems.append(f"{info.name}.conformance_params() returned {type(entries).__name__}, expected a list")
            continue
        for i, params in enumerate(entries):
            key = f"{info.name}.conformance_params()[{i}]"
            if not isinstance(params, dict):
                problems.append(f"{key}: expected a dict of parameters (got {params!r})")
                continue
            try:
                spec = resolve_ref(registry, "task", {info.name: params}, "conformance", key)
                kinds = frozenset(spec.instance.problem_kinds)
                spec.instance.problem_kind  # noqa: B018 -- must be readable
                spec.instance.budget_kind  # noqa: B018
            except SuiteError as exc:
                problems.append(f"{key}: {exc.message}")
                continue
            except Exception as exc:
                problems.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            if not kinds:
                problems.append(f"{key}: the configured task declares no problem kinds")
                continue
            configs.append(TaskConfig(spec, i, _builtin(info)))
    return configs, problems


class Partners:
    """Plugins of one kind built with their defaults, in order of preference; built lazily, once."""

    def __init__(self, registry: Registry, exclude: str | None = None):
        self.registry, self.exclude = registry, exclude
        self._specs: dict[str, list[tuple[PluginInfo, PluginSpec]]] = {}

    def of(self, kind: str) -> list[tuple[PluginInfo, PluginSpec]]:
        if kind not in self._specs:
            out = []
            for info in self.registry.plugins[kind].values():
                if info.name == self.exclude:
                    continue
                try:
                    out.append((info, resolve_ref(self.registry, kind, info.name, "partner", info.name)))
                except Exception:  # a partner that cannot be built with its defaults is no partner
                    continue
            self._specs[kind] = out
        return self._specs[kind]

    def ordered(self, kind: str, budget_kind: str | None) -> list[PluginSpec]:
        def key(item):
            info, spec = item
            inst = spec.instance
            try:
                budget_free = not inst.uses_budget(budget_kind) if kind == "selector" else False
            except Exception:
                budget_free = True
            simplicity = len(getattr(type(inst), "Params", PluginParams).model_fields)
            return (not _builtin(info), budget_free, simplicity, -len(getattr(inst, "problem_kinds", ())), info.name)

        return [spec for _, spec in sorted(self.of(kind), key=key)]


def _pairs(config: TaskConfig, selector: PluginSpec, factorization: PluginSpec, kind: str) -> bool:
    shared = config.kinds & frozenset(selector.instance.problem_kinds) & frozenset(factorization.instance.problem_kinds)
    if kind not in shared:
        return False
    try:
        return pairing_skip_reason(config.spec, selector, factorization) is None
    except Exception:
        return False


def _configs_for(configs: list[TaskConfig], kind: str) -> list[TaskConfig]:
    speaking = [c for c in configs if kind in c.kinds]
    return sorted(speaking, key=lambda c: (not c.builtin, c.main_kind != kind))  # stable: task order kept


def find_method_exercise(
    configs: list[TaskConfig], partners: Partners, subject: PluginSpec, kind: str
) -> tuple[Exercise | None, str]:
    """A tiny cell for ``subject`` (a selector or factorization) on problem kind ``kind``, or (None, why not)."""
    candidates = _configs_for(configs, kind)
    if not candidates:
        return None, f"no task offers a conformance configuration of kind {kind}"
    other = "factorization" if subject.kind == "selector" else "selector"
    for config in candidates:
        for partner in partners.ordered(other, config.spec.instance.budget_kind):
            selector, factorization = (subject, partner) if other == "factorization" else (partner, subject)
            if _pairs(config, selector, factorization, kind):
                return Exercise(kind, config, selector, factorization), ""
    tried = ", ".join(dict.fromkeys(c.label for c in candidates))
    return None, f"no {other} pairs with it on the {kind} configurations ({tried})"


def find_pair(config: TaskConfig, partners: Partners, kind: str) -> Exercise | None:
    budget_kind = config.spec.instance.budget_kind
    for selector in partners.ordered("selector", budget_kind):
        for factorization in partners.ordered("factorization", budget_kind):
            if _pairs(config, selector, factorization, kind):
                return Exercise(kind, config, selector, factorization)
    return None


def build_cells(exercises: list[Exercise], device: str, timeout: float | None) -> list[Cell]:
    """The cells of the exercises (each with its own ``cells``) plus one reference cell per task configuration.
    ``device`` as asked for (``auto``, ``cpu``, ``cuda``): under ``auto`` a task too small to gain from a GPU
    (``gpu_benefit = False``) stays on the CPU, as in ``bench run`` (``envinfo.task_device``)."""
    from rankbench.envinfo import resolve_device, task_device

    requested, resolved = device, resolve_device(device)
    cells: dict[str, Cell] = {}
    for ex in exercises:
        task = ex.config.spec
        device = task_device(task.instance, requested, resolved)
        ref = make_cell(SUITE, task, None, None, None, None, SEED, device, timeout, problem_kind=cell_kind(task.instance))
        cells.setdefault(ref.cell_id, ref)
        if ex.selector is None:
            ex.cells = [ref]
            continue
        budget_kind = task.instance.budget_kind
        uses = budget_kind in BUDGETS and ex.selector.instance.uses_budget(budget_kind)
        budget = BUDGETS[budget_kind] if uses else None
        cell = make_cell(
            SUITE, task, ex.selector, ex.factorization, budget, budget_kind if uses else None, SEED, device, timeout,
            problem_kind=cell_kind(task.instance, ex.selector.instance, ex.factorization.instance),
        )
        cells.setdefault(cell.cell_id, cell)
        ex.cells = [cell]
    return list(cells.values())


# ---------------------------------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class CellResult:
    status: str
    reason: str
    wall_s: float
    metrics: dict[str, tuple[float, str, bool | None]]  # name -> (value, unit, higher_is_better)
    ranks: dict[str, tuple[int, str, int]]  # site -> (rank, rank per mode, params)


NO_IN_PROCESS_EXECUTOR = (
    "no cell can run: no registered executor runs cells in this process (one that declares `in_process = True`, "
    "as the built-in `inprocess` does; is it left out by RANKBENCH_LOAD_PLUGINS, or among the load failures?)"
)


def in_process_executor(registry: Registry) -> Executor | None:
    """The registered executor that runs cells in this process (``Executor.in_process``; built-ins first), built with
    its default parameters: the tiny cells run through it, and an executor under test is compared with it. None when
    none is loaded (or none builds)."""
    for info in sorted(registry.plugins["executor"].values(), key=lambda i: (not _builtin(i), i.name)):
        if info.cls.in_process:
            try:
                return info.cls()
            except Exception:  # noqa: BLE001 -- a broken one is no reference; the next may do
                continue
    return None


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    try:
        import torch
    except ImportError:  # pragma: no cover -- a host without torch runs only numpy plugins
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_tiny(
    cells: list[Cell], registry: Registry, device: str, timeout: float | None, plugins_dir: str | None, folder: Path,
    executor=None,
) -> dict[str, CellResult]:
    """Run ``cells`` with the real runner into ``folder/results`` (cache in ``folder/cache``) through ``executor``
    (default: the registered in-process executor); read them back."""
    from rich.console import Console

    from rankbench import results
    from rankbench.envinfo import resolve_device
    from rankbench.runner import CACHE_ENV, Runtime, run_cells

    out, cache = folder / "results", folder / "cache"
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(registry=registry, device=device, timeout=timeout, plugins_dir=plugins_dir, threads=THREADS)
    with _environment(**{CACHE_ENV: str(cache)}):
        executor = executor or in_process_executor(registry)
        if executor is None:
            raise RuntimeError(NO_IN_PROCESS_EXECUTOR)
        run_cells(cells, out, runtime, executor, {"git_sha": "", "device": resolve_device(device)}, force=True,
                  console=Console(stderr=True, quiet=True))
    table = results.read_table(out, "cells")
    metrics = results.read_table(out, "metrics")
    ranks = results.read_table(out, "ranks")
    found: dict[str, CellResult] = {}
    for row in table.itertuples():
        found[row.cell_id] = CellResult(row.status, row.reason or "", float(row.wall_s or 0.0), {}, {})
    for row in metrics.itertuples():
        if row.cell_id in found:
            hib = None if row.higher_is_better is None or row.higher_is_better != row.higher_is_better else bool(
                row.higher_is_better)
            found[row.cell_id].metrics[row.metric] = (float(row.value), row.unit or "", hib)
    for row in ranks.itertuples():
        if row.cell_id in found:
            found[row.cell_id].ranks[row.site] = (int(row.rank), str(row.rank_per_mode or row.rank), int(row.params))
    return found


def is_time_or_memory(metric: str, unit: str) -> bool:
    """Time and memory metrics vary between runs by nature; the kinds are ``bench compare``'s."""
    return metric_kind(metric, unit or "") in ("time", "memory")


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def compare(a: CellResult, b: CellResult, keep: Callable[[str, str, bool | None], bool], ranks: bool) -> list[str]:
    """Differences between two runs of one cell: statuses, the kept metrics, and (``ranks``) the ranks table."""
    diffs = []
    if a.status != b.status:
        diffs.append(f"status {a.status} vs {b.status}")
    if ranks and a.ranks != b.ranks:
        sites = sorted(s for s in set(a.ranks) | set(b.ranks) if a.ranks.get(s) != b.ranks.get(s))
        shown = ", ".join(
            f"{s} {a.ranks.get(s, (None, '-'))[1]} vs {b.ranks.get(s, (None, '-'))[1]}" for s in sites[:3]
        )
        diffs.append(f"ranks differ ({shown}{', ...' if len(sites) > 3 else ''})")
    for name in sorted(set(a.metrics) | set(b.metrics)):
        ref = a.metrics.get(name) or b.metrics[name]
        if not keep(name, ref[1], ref[2]):
            continue
        if name not in a.metrics or name not in b.metrics:
            diffs.append(f"{name} reported in one run only")
        elif not _same(a.metrics[name][0], b.metrics[name][0]):
            diffs.append(f"{name} {a.metrics[name][0]:.10g} vs {b.metrics[name][0]:.10g}")
    return diffs


def _deterministic_metric(name: str, unit: str, hib: bool | None) -> bool:
    return not is_time_or_memory(name, unit)


def _agreement_metric(name: str, unit: str, hib: bool | None) -> bool:
    return not is_time_or_memory(name, unit) and (hib is not None or name in _CONTRACT_SIZE_METRICS)


def budget_problem(cell: Cell, result: CellResult) -> str | None:
    """Why an ok cell breaks its budget (None: it respects it)."""
    budget, kind, m = cell.budget, cell.budget_kind, result.metrics
    if kind == PARAM_RATIO:
        if "param_ratio" not in m:
            return "the cell reported no param_ratio metric"
        ratio = m["param_ratio"][0]
        if not ratio <= budget + BUDGET_SLACK:
            return f"param_ratio {ratio:.6g} > budget {budget:g}"
        return None
    if kind == RANK_TOTAL:
        if "rank_total" in m:
            total = m["rank_total"][0]
        elif result.ranks:
            total = sum(r[0] for r in result.ranks.values())
        else:
            return "the cell reported neither a rank_total metric nor per-site ranks"
        if not total <= budget + BUDGET_SLACK:
            return f"total rank {total:g} > budget {budget:g}"
        return None
    if kind == RANK_CAP:
        if result.ranks:
            worst = max(
                (max(int(x) for x in per_mode.split("x")) if per_mode else rank, site)
                for site, (rank, per_mode, _) in result.ranks.items()
            )
            if worst[0] > budget + BUDGET_SLACK:
                return f"site {worst[1]} has rank {worst[0]} > cap {budget:g}"
            return None
        if "rank_selected" in m:
            if m["rank_selected"][0] > budget + BUDGET_SLACK:
                return f"rank_selected {m['rank_selected'][0]:g} > cap {budget:g}"
            return None
        return "the cell reported neither per-site ranks nor a rank_selected metric"
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


# ---------------------------------------------------------------------------------------------------------------------
# The checks of one kind of plugin


def _judge_runs(report: Report, exercises: list[Exercise], results: dict[str, CellResult], subject: str) -> None:
    for ex in exercises:
        what = ex.partner_text(subject)
        for cell in ex.cells:
            res = results.get(cell.cell_id)
            budget = "" if cell.budget is None else f", {cell.budget_kind} {cell.budget:g}"
            if res is None:
                report.add("runs", ex.scope, FAIL, f"{what}{budget}: the runner wrote no result for the cell")
            elif res.status == "ok":
                report.add("runs", ex.scope, PASS, f"{what}{budget}: ok in {res.wall_s:.2f} s")
            elif res.status == "skipped":
                report.add("runs", ex.scope, NOT_EXERCISED, f"{what}{budget}: skipped: {_first_line(res.reason)}")
            else:
                report.add("runs", ex.scope, FAIL, f"{what}{budget}: {res.status}: {_first_line(res.reason)}")


def _judge_budget(report: Report, exercises: list[Exercise], results: dict[str, CellResult]) -> None:
    for ex in exercises:
        if ex.selector is None:
            continue
        for cell in ex.cells:
            res = results.get(cell.cell_id)
            if res is None or res.status != "ok":
                continue
            if cell.budget is None:
                why = "budget-free task" if ex.config.spec.instance.budget_kind is None else (
                    f"{ex.selector.name} chooses ranks by itself (budget null)")
                report.add("budget", ex.scope, NA, why)
                continue
            problem = budget_problem(cell, res)
            if problem:
                report.add("budget", ex.scope, FAIL, problem)
            else:
                report.add("budget", ex.scope, PASS, _budget_text(cell, res))


def _budget_text(cell: Cell, res: CellResult) -> str:
    if cell.budget_kind == PARAM_RATIO:
        return f"param_ratio {res.metrics['param_ratio'][0]:.4g} <= {cell.budget:g}"
    if cell.budget_kind == RANK_TOTAL:
        total = res.metrics["rank_total"][0] if "rank_total" in res.metrics else sum(r[0] for r in res.ranks.values())
        return f"total rank {total:g} <= {cell.budget:g}"
    return f"every rank <= cap {cell.budget:g}"


def _judge_determinism(
    report: Report, exercises: list[Exercise], first: dict[str, CellResult], second: dict[str, CellResult]
) -> None:
    for ex in exercises:
        for cell in ex.cells:
            a, b = first.get(cell.cell_id), second.get(cell.cell_id)
            if a is None or a.status != "ok":
                continue
            if b is None:
                report.add("deterministic", ex.scope, FAIL, "the second run wrote no result for the cell")
                continue
            diffs = compare(a, b, _deterministic_metric, ranks=True)
            compared = sum(1 for n, (_, u, h) in a.metrics.items() if _deterministic_metric(n, u, h))
            if diffs:
                shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
                report.add("deterministic", ex.scope, FAIL, f"two runs with seed {SEED} differ: {shown}")
            else:
                report.add("deterministic", ex.scope, PASS, f"{compared} metrics and the ranks identical over 2 runs")


def _run_twice(
    report: Report, exercises: list[Exercise], registry: Registry, device: str, timeout: float | None,
    plugins_dir: str | None, folder: Path, subject: str, log: Callable[[str], None],
) -> None:
    cells = build_cells(exercises, device, timeout)
    log(f"running {len(cells)} tiny cells: " + ", ".join(dict.fromkeys(e.scope for e in exercises)))
    first = run_tiny(cells, registry, device, timeout, plugins_dir, folder / "run-1")
    _judge_runs(report, exercises, first, subject)
    _judge_budget(report, exercises, first)
    if not any(first.get(c.cell_id) and first[c.cell_id].status == "ok" for e in exercises for c in e.cells):
        return
    log("running them again (determinism)")
    second = run_tiny(cells, registry, device, timeout, plugins_dir, folder / "run-2")
    _judge_determinism(report, exercises, first, second)


def _method(report, registry, spec, device, timeout, plugins_dir, folder, log) -> None:
    configs, _ = task_configs(registry)
    partners = Partners(registry, exclude=None)
    exercises = []
    for kind in sorted(spec.instance.problem_kinds):
        ex, why = find_method_exercise(configs, partners, spec, kind)
        if ex is None:
            report.add("runs", kind, NOT_EXERCISED, why)
        else:
            exercises.append(ex)
    if not exercises:
        report.add("runs", "-", FAIL, f"none of its problem kinds ({', '.join(sorted(spec.instance.problem_kinds))}) "
                   "could be exercised on a tiny problem")
        return
    _run_twice(report, exercises, registry, device, timeout, plugins_dir, folder, spec.kind, log)


def _task(report, registry, info, device, timeout, plugins_dir, folder, log) -> None:
    configs, problems = task_configs(registry, only=info.name)
    for problem in problems:
        report.add("configurations", "-", FAIL, problem)
    if not configs:
        if not problems:
            report.add("configurations", "-", WARN, "conformance_params() is empty: the task offers no tiny "
                       "configuration, so its cells are not exercised")
        return
    if not problems:
        kinds = sorted({c.main_kind for c in configs})
        report.add("configurations", "-", PASS, f"{len(configs)} tiny configuration(s): {', '.join(kinds)}")
    partners = Partners(registry)
    exercises = []
    for config in configs:
        exercises.append(Exercise("reference", config))
        for kind in sorted(config.kinds):
            ex = find_pair(config, partners, kind)
            if ex is None:
                report.add("runs", f"{kind} on {config.label}", NOT_EXERCISED,
                           "no selector and factorization pair with it on this kind")
            else:
                exercises.append(ex)
    _run_twice(report, exercises, registry, device, timeout, plugins_dir, folder, "task", log)


def _executor(report, registry, info, spec, device, timeout, plugins_dir, folder, log) -> None:
    configs, _ = task_configs(registry)
    partners = Partners(registry)
    chosen = None
    for config in configs:
        chosen = find_pair(config, partners, config.main_kind)
        if chosen is not None:
            break
    if chosen is None:
        report.add("runs", "-", FAIL, "no task configuration with a selector/factorization pair to run")
        return
    exercises = [Exercise("reference", chosen.config), chosen]
    cells = build_cells(exercises, device, timeout)
    log(f"running {len(cells)} tiny cells in this process, then through executor {info.name}")
    here = run_tiny(cells, registry, device, timeout, plugins_dir, folder / "here")
    try:
        there = run_tiny(cells, registry, device, timeout, plugins_dir, folder / "executor", executor=spec.instance)
    except Exception as exc:
        report.add("runs", chosen.scope, FAIL, f"the executor raised {type(exc).__name__}: {_first_line(str(exc))}")
        return
    _judge_runs(report, exercises, there, "executor")
    for ex in exercises:
        for cell in ex.cells:
            a, b = here.get(cell.cell_id), there.get(cell.cell_id)
            if a is None or b is None:
                continue
            diffs = compare(a, b, _agreement_metric, ranks=False)
            if diffs:
                report.add("agrees", ex.scope, FAIL, f"in this process vs {info.name}: " + "; ".join(diffs[:4]))
            else:
                compared = sum(1 for n, (_, u, h) in a.metrics.items() if _agreement_metric(n, u, h))
                report.add("agrees", ex.scope, PASS, f"status {a.status} and {compared} quality metrics as in this "
                           "process")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def run_conformance(
    name: str,
    kind: str | None = None,
    plugins_dir: str | None = None,
    device: str = "cpu",
    timeout: float | None = CELL_TIMEOUT,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    registry: Registry | None = None,
) -> Report:
    """Run every check for plugin ``name``. Raises ``ConformanceInputError`` for an unknown/ambiguous name.
    ``out``: keep the tiny runs' results there (default: a temporary folder, removed afterwards)."""
    log = log or (lambda message: None)
    start = time.perf_counter()
    registry = registry if registry is not None else load_plugins(plugins_dir)
    found_kind, info, failures = find_plugin(registry, name, kind)
    report = Report(name, found_kind)
    if failures:
        for failure in failures:
            report.add("loads", "-", FAIL, f"{failure.plugin} ({failure.distribution}): {failure.error}")
    if info is None:
        report.seconds = time.perf_counter() - start
        return report
    if not failures:
        report.add("loads", "-", PASS, f"{info.kind} from {info.distribution} {info.dist_version} ({info.source})")
    spec = check_declarations(report, info)
    if spec is None:
        report.add("runs", "-", NOT_EXERCISED, "not run: the plugin cannot be built with its default parameters")
    elif in_process_executor(registry) is None:
        report.add("runs", "-", FAIL, NO_IN_PROCESS_EXECUTOR)
    else:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_torch_threads(THREADS))
            if out is None:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rankbench-conformance-")))
            else:
                folder = Path(out)
                folder.mkdir(parents=True, exist_ok=True)
            if info.kind in ("selector", "factorization"):
                _method(report, registry, spec, device, timeout, plugins_dir, folder, log)
            elif info.kind == "task":
                _task(report, registry, info, device, timeout, plugins_dir, folder, log)
            elif info.kind == "executor":
                _executor(report, registry, info, spec, device, timeout, plugins_dir, folder, log)
    report.seconds = time.perf_counter() - start
    return report


def format_report(report: Report, width: int = 72) -> str:
    from tabulate import tabulate

    return tabulate(report.rows(), headers=["check", "kind / task", "verdict", "detail"], maxcolwidths=[None, None,
                    None, width])
