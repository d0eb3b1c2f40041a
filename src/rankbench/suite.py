"""Suite files: schema (pydantic), validation with clear messages, and cartesian expansion into cells.

A suite names tasks, selectors and factorizations (each a bare plugin name or ``{name: {param: value}}``), budgets,
seeds and a per-cell timeout; or ``slices``, several such products (each may set its own budgets and seeds) whose
union is run. Every problem in the file is reported as ``FILE: KEY: expected ...`` through
``SuiteError``; the CLI turns that into exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rankbench.api import PARAM_RATIO, RANK_CAP, RANK_TOTAL, Plugin
from rankbench.cells import Cell, make_cell
from rankbench.envinfo import task_device
from rankbench.files import InputFileError, excerpt, read_yaml_mapping
from rankbench.kinds import cell_kind, pairing_skip
from rankbench.plugins import Registry

PluginRef = str | dict[str, dict[str, Any] | None]


class SuiteError(Exception):
    """A bad suite (or bad CLI input): one clear message naming the file, the key and what was expected."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


Finite = Annotated[float, Field(allow_inf_nan=False)]
Budgets = list[Finite] | dict[Literal["param_ratio", "rank_total", "rank_cap"], list[Finite]]
Seed = Annotated[int, Field(ge=0, lt=2**63)]  # the results schema stores seeds as int64


class SliceFile(BaseModel):
    """One cartesian product of a suite with ``slices``; budgets and seeds default to the suite's."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[PluginRef] = Field(min_length=1)
    selectors: list[PluginRef] = Field(min_length=1)
    factorizations: list[PluginRef] = Field(min_length=1)
    budgets: Budgets | None = None
    seeds: list[Seed] | None = Field(default=None, min_length=1)


class SuiteFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    # the cartesian product tasks x selectors x factorizations x budgets x seeds; a suite may instead (or also) list
    # ``slices``, each its own product, and runs their union (e.g. a nightly slice of every task family)
    tasks: list[PluginRef] | None = Field(default=None, min_length=1)
    selectors: list[PluginRef] | None = Field(default=None, min_length=1)
    factorizations: list[PluginRef] | None = Field(default=None, min_length=1)
    slices: list[SliceFile] = Field(default_factory=list)
    # one list for every task, or a list per budget kind when a suite mixes tasks of different kinds
    budgets: Budgets = Field(default_factory=list)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    timeout: float | None = Field(default=900.0, gt=0, allow_inf_nan=False)  # seconds per cell; null: no limit
    executor: PluginRef | None = None  # a name, or {name: {param: value}} (e.g. {submitit: {cells_per_job: 16}})
    device: Literal["auto", "cpu", "cuda"] | None = None
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads for the cells (bench run --threads wins)
    deterministic: bool = False  # deterministic torch algorithms for the cells (bench run --[no-]deterministic wins)


@dataclasses.dataclass
class PluginSpec:
    kind: str
    name: str
    params: dict[str, Any]  # validated, defaults filled in, JSON-ready
    instance: Plugin
    version: str


@dataclasses.dataclass
class Suite:
    path: str
    spec: SuiteFile

    @property
    def name(self) -> str:
        return self.spec.name


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in ("float", "int", "str")):
            continue  # pydantic's tag of a union member (e.g. "list[float]"), not a key of the file
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_message(err: dict) -> str:
    msg = err["msg"]
    if err["loc"] and err["loc"][0] == "budgets" and len(err["loc"]) <= 2 and err["type"] in ("list_type", "dict_type"):
        return "expected a list of numbers, or a mapping from budget kind (param_ratio, rank_total, rank_cap) to one"
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if "input" in err and err["type"] not in ("union_tag_invalid",):
        return f"{msg} (got {excerpt(err['input'])})"
    return msg


def load_suite(path: str | Path) -> Suite:
    file = str(path)
    try:
        data = read_yaml_mapping(path, "a suite file", "keys name, tasks, selectors, factorizations, ...")
    except InputFileError as exc:
        raise SuiteError(file, exc.where, exc.message) from None
    try:
        spec = SuiteFile.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        if err["loc"][0] == "budgets" and isinstance(data.get("budgets"), dict):  # report the mapping branch
            err = next((e for e in errors if len(e["loc"]) > 1 and str(e["loc"][1]).startswith("dict[")), err)
        loc = err["loc"]
        # For PluginRef unions pydantic reports every branch; keep the path up to the item.
        axes = ("tasks", "selectors", "factorizations")
        at = 2 if len(loc) >= 4 and loc[0] == "slices" and isinstance(loc[1], int) else 0
        if len(loc) >= at + 2 and loc[at] in axes and isinstance(loc[at + 1], int):
            owner = data["slices"][loc[1]] if at else data
            item = owner[loc[at]][loc[at + 1]]
            raise SuiteError(
                file, _key(loc[: at + 2]), f"expected a plugin name or {{name: {{param: value}}}} (got {excerpt(item)})"
            ) from None
        raise SuiteError(file, _key(loc), _pydantic_message(err)) from None
    axes = ("tasks", "selectors", "factorizations")
    given = [axis for axis in axes if getattr(spec, axis) is not None]
    if given and len(given) < 3:
        missing = next(axis for axis in axes if axis not in given)
        raise SuiteError(file, missing, "required key is missing (tasks, selectors and factorizations go together)")
    if not given and not spec.slices:
        raise SuiteError(file, "tasks", "required key is missing (or give slices: a list of tasks/selectors/...)")
    for prefix, product in _products(spec):
        for axis in axes:
            for i, ref in enumerate(getattr(product, axis)):
                if isinstance(ref, dict) and len(ref) != 1:
                    raise SuiteError(
                        file,
                        f"{prefix}{axis}[{i}]",
                        f"expected a plugin name or {{name: {{param: value}}}} with one name (got {excerpt(ref)})",
                    )
    return Suite(file, spec)


def _products(spec: SuiteFile) -> list[tuple[str, SuiteFile | SliceFile]]:
    """(key prefix, product) for the top-level product (if given) and every slice."""
    top = [("", spec)] if spec.tasks is not None else []
    return top + [(f"slices[{i}].", piece) for i, piece in enumerate(spec.slices)]


def resolve_ref(registry: Registry, kind: str, ref: PluginRef, file: str, key: str) -> PluginSpec:
    if isinstance(ref, str):
        name, raw = ref, {}
    else:
        ((name, raw),) = ref.items()
        raw = raw or {}
    if name not in registry.plugins[kind]:
        known = ", ".join(registry.names(kind)) or "none loaded"
        raise SuiteError(file, key, f"unknown {kind} {excerpt(name, 60)}; expected one of: {known}{_load_hint(registry, name)}")
    info = registry.get(kind, name)
    try:
        params = info.cls.Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SuiteError(
            file, f"{key}.{name}.{_key(err['loc'])}" if err["loc"] else f"{key}.{name}", _pydantic_message(err)
        ) from None
    try:
        instance = info.cls(params)
    except Exception as exc:
        raise SuiteError(file, f"{key}.{name}", f"invalid parameters ({type(exc).__name__}: {excerpt(str(exc), 200)})") from None
    resolved = params.model_dump(mode="json")
    try:  # a cell carries every resolved field to the process that runs it, which validates them again
        info.cls.Params.model_validate(resolved)
    except ValidationError as exc:
        raise SuiteError(
            file, f"{key}.{name}", f"{kind} {name} rejects its own resolved parameters, as the process running the cell "
            f"would ({excerpt(_pydantic_message(exc.errors()[0]), 160)}); a validator must not depend on which fields "
            "were spelled out") from None
    return PluginSpec(kind, name, resolved, instance, info.version)


def _load_hint(registry: Registry, name: str) -> str:
    """Where a plugin file failed to load, the unknown name may be in it: say so (``bench plugins`` shows why)."""
    failed = [f.plugin for f in registry.failures]
    if not failed:
        return ""
    near = [p for p in failed if name.replace("-", "_") in p.replace("-", "_")]
    listed = ", ".join(near or failed[:5])
    return f" ({'it may be in' if near else 'note that'} plugin(s) that failed to load: {listed}; see `bench plugins`)"


def _check_budget(value: float, kind: str | None, file: str, key: str) -> float:
    if kind == PARAM_RATIO and not 0.0 < value <= 1.0:
        raise SuiteError(
            file, key, f"expected a kept-parameter fraction in (0, 1] for budget kind param_ratio (got {value})"
        )
    if kind in (RANK_CAP, RANK_TOTAL) and (value < 1 or value != int(value)):
        raise SuiteError(file, key, f"expected a positive integer rank for budget kind {kind} (got {value})")
    return value


def pairing_skip_reason(task: PluginSpec, selector: PluginSpec, factorization: PluginSpec) -> str | None:
    return pairing_skip(task.instance, selector.instance, factorization.instance)


def expand(suite: Suite, registry: Registry, device: str, timeout: float | None,
           device_is_auto: bool = False) -> list[Cell]:
    """The cartesian product tasks x factorizations x selectors x budgets x seeds, plus one dense reference cell
    per task configuration and seed. Budget-free selectors run once (budget null); incompatible pairs become cells
    with a skip reason. ``device``: the run's resolved device; with ``device_is_auto`` (it came from ``auto``) the
    cells of a task with ``gpu_benefit = False`` run on the CPU (``envinfo.task_device``)."""
    spec = suite.spec
    cells: list[Cell] = []
    seen: set[str] = set()

    def add(cell: Cell) -> None:
        if cell.cell_id not in seen:  # the same item listed twice (or in two slices) is one cell
            seen.add(cell.cell_id)
            cells.append(cell)

    for prefix, product in _products(spec):
        _expand_product(suite, registry, device, timeout, product, prefix, add, device_is_auto)
    return cells


def _expand_product(suite: Suite, registry: Registry, device: str, timeout: float | None,
                    product: SuiteFile | SliceFile, prefix: str, add, device_is_auto: bool = False) -> None:
    spec, file = suite.spec, suite.path
    tasks = [resolve_ref(registry, "task", r, file, f"{prefix}tasks[{i}]") for i, r in enumerate(product.tasks)]
    selectors = [
        resolve_ref(registry, "selector", r, file, f"{prefix}selectors[{i}]") for i, r in enumerate(product.selectors)
    ]
    factorizations = [
        resolve_ref(registry, "factorization", r, file, f"{prefix}factorizations[{i}]")
        for i, r in enumerate(product.factorizations)
    ]
    all_budgets, budgets_key = (spec.budgets, "budgets") if product.budgets is None else (product.budgets,
                                                                                          f"{prefix}budgets")
    seeds = spec.seeds if product.seeds is None else product.seeds
    for task in tasks:
        cell_device = task_device(task.instance, "auto" if device_is_auto else device, device)
        budget_kind = task.instance.budget_kind
        if isinstance(all_budgets, dict):
            raw, key = all_budgets.get(budget_kind, []), f"{budgets_key}.{budget_kind}"
        else:
            raw, key = all_budgets, budgets_key
        budgets = [_check_budget(b, budget_kind, file, f"{key}[{i}]") for i, b in enumerate(raw)]
        for seed in seeds:
            add(make_cell(suite.name, task, None, None, None, None, seed, cell_device, timeout,
                          problem_kind=cell_kind(task.instance)))
            for factorization in factorizations:
                for selector in selectors:
                    reason = pairing_skip_reason(task, selector, factorization)
                    uses_budget = selector.instance.uses_budget(budget_kind)
                    if uses_budget and not budgets and reason is None:
                        raise SuiteError(
                            file,
                            key,
                            f"expected at least one budget: selector {selector.name} needs one for task "
                            f"{task.name} (budget kind {budget_kind})",
                        )
                    for budget in budgets if uses_budget else [None]:
                        add(
                            make_cell(
                                suite.name,
                                task,
                                selector,
                                factorization,
                                budget,
                                budget_kind if budget is not None else None,
                                seed,
                                cell_device,
                                timeout,
                                reason,
                                cell_kind(task.instance, selector.instance, factorization.instance),
                            )
                        )
