"""Claims as standing checks: ``bench verify CLAIMS.yaml RESULTS_DIR [RESULTS_DIR ...]``.

A claim is declarative data -- what a paper says, which results can judge it, and when the protocol is adequate --
and its verdict is recomputed from whatever results folders are at hand, so a claim that held yesterday and fails
today shows up like a regression.

Claims file
-----------
A YAML mapping ``{description: ..., claims: [...]}``; every claim (unknown keys are errors)::

    id: sublora-beats-adalora-pinn            # unique in the file
    source: "Gao & Tan 2025 (arXiv 2507.01841), abstract"
    statement: "SubLoRA fine-tunes PINNs to a lower l2re than AdaLoRA at equal total rank"   # one line
    suite: suites/pinn.yaml                   # optional: the shipped suite whose cells the claim must match
    select:
      task: pinn
      task_params: {problem: adaptation}      # a subset of the task's parameters (defaults are filled in results)
      metric: l2re                            # default: the task's primary metric
      budgets: [6, 12]                        # optional: only these budgets
      higher_is_better: false                 # optional: only where the metric records no direction
    methods:                                  # selector and/or factorization, as in suites: a name or
      - {selector: {sublora: {mode: posthoc}}, factorization: lora}      # {name: {param: value}} (a subset)
      - {selector: adalora, factorization: lora}
    relation: {kind: better}
    adequacy: {min_seeds: 3, finetuning_beats_pretrained: true}

Relations (``relation.kind``):

* ``better``: ``methods[0]`` is better than ``methods[1]`` on the metric (direction from ``higher_is_better``),
  paired by seed per configuration (``stats.paired_comparison``).
* ``ordering``: ``methods`` from best to worst; every adjacent pair is a ``better`` relation.
* ``within_of_dense`` (``percent``): each method's relative quality loss against the dense reference of the same
  task configuration and seed, ``(dense - A) / |dense|`` oriented so that positive is worse, has a mean over seeds
  whose bootstrap interval lies at or below ``percent`` / 100.
* ``compression_at_loss`` (``compression``, ``loss``, ``loss_kind``: ``absolute`` or ``relative``): the compression
  ratio ``1 / param_ratio`` of the method's cells is at least ``compression`` and its quality loss against dense
  (absolute: in the metric's unit; relative: a fraction of the dense value) at most ``loss``; both are mean-over-
  seeds intervals, and the relation holds when both hold.
* ``rank_recovered`` (``percent``, default 100): ``rank_selected == rank_true`` in at least ``percent`` % of the
  seeds (matrix/tensor recovery).
* ``rate`` (``slope: [lo, hi]``, either may be null): the least-squares slope per seed of either a ``curve`` (from
  the ``curves`` table, e.g. ``rel_error`` against iteration; ``window``: the fraction of its steps fitted, default
  the second half) or of the metric ``against`` a numeric task parameter (across the configurations that differ in
  it only); ``x`` and ``y`` are ``linear`` or ``log`` (default: linear steps, log values). Its mean over seeds has
  an interval inside ``[lo, hi]``.

``adequacy`` (checked per configuration, before the relation; a failure makes that configuration
``inconclusive (protocol)`` and says which condition failed):

* ``min_seeds``: every cell group the relation uses has at least this many ``ok`` seeds;
* ``dense``: conditions ``{metric, op, value}`` on the dense reference cells (every seed), ``value`` a number or the
  name of another metric of the same cell;
* ``method``: the same conditions on the claim's methods' own cells (every seed), e.g. ``{metric: rank_selected, op:
  ">", value: rank_true}`` for an over-parameterised solver;
* ``finetuning_beats_pretrained``: the dense reference (full fine-tuning of an adaptation task) is better than the
  pretrained network in every seed: the metric against ``<metric>_pretrained`` (``l2re`` against
  ``l2re_pretrained`` on PINN adaptation results). A configuration failing it is not a protocol failure of the
  claim but a transfer problem that fine-tuning cannot learn: it is ``excluded`` (listed with its numbers) and the
  other configurations decide the verdict.

Matching
--------
Results are the ``ok`` cells of the newest run of every configuration (``results.latest_cells``) over all the
folders given. A method matches the cells whose selector / factorization it names (and whose parameters contain the
given subset). A *configuration* is the task configuration, the budget, and the method axes (selector or
factorization) that no method of the claim names; its seeds are the repeats. A method matching two variants in one
configuration (e.g. ``sublora`` where the suite runs ``mode: posthoc`` and ``mode: joint``) is an error of the claim:
the configuration is ``inconclusive (protocol)`` until the claim names the parameter. The dense reference of a
configuration is the ``none``/``dense`` cell of the same task configuration and seed.

Verdicts
--------
Per configuration: ``reproduced`` when the relation holds beyond noise (the 95 % bootstrap interval of the paired
difference, or of the mean over seeds, lies on the claimed side of its bound), ``contradicted`` when the opposite
holds beyond noise, ``inconclusive (noise)`` when the interval straddles the bound or fewer than ``stats.MIN_SEEDS``
seeds are there for a paired call ("n too small"). ``rank_recovered`` counts seeds (no interval): fewer than
``MIN_SEEDS`` seeds is "n too small", else the fraction decides.

Aggregation over configurations (and over the links of an ``ordering`` and the parts of ``compression_at_loss``),
in this order:

1. no configuration with results: ``not run``; every configuration with results ``excluded``: ``inconclusive
   (protocol)``; otherwise the excluded ones are set aside;
2. any (adequate) configuration contradicted: ``contradicted`` -- a claim stated without conditions must hold in
   every configuration it covers;
3. any configuration failing an adequacy condition: ``inconclusive (protocol)``;
4. every configuration reproduced: ``reproduced``;
5. otherwise: ``inconclusive (noise)``.

Each configuration is tested at 95 %, so with many configurations a false "contradicted" becomes more likely; the
per-configuration numbers in ``Verdict.numbers`` show how many configurations and which ones decided.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rankbench import results
from rankbench.cells import REFERENCE_FACTORIZATION, REFERENCE_SELECTOR
from rankbench.files import InputFileError, read_yaml_mapping
from rankbench.stats import MIN_SEEDS, TOO_FEW, Paired, paired_comparison, seed_interval

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
NOISE = "inconclusive (noise)"
PROTOCOL = "inconclusive (protocol)"
NOT_RUN = "not run"
VERDICTS = (REPRODUCED, CONTRADICTED, NOISE, PROTOCOL, NOT_RUN)
# a configuration's own status (never a claim's verdict): left out of the aggregation, with the reason
EXCLUDED = "excluded"
AXES = ("selector", "factorization")


class ClaimsError(Exception):
    """A bad claims file or results folder: one message naming the file, the key and what was expected."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


# ---------------------------------------------------------------------------------------------------------------------
# The claims file

PluginRef = str | dict[str, dict[str, Any] | None]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodRef(Strict):
    """One method of a claim: a selector and/or a factorization, each a name or ``{name: {param: value}}``."""

    selector: PluginRef | None = None
    factorization: PluginRef | None = None
    label: str | None = None  # how the verdict names it (default: built from the references)

    @model_validator(mode="after")
    def _check(self) -> MethodRef:
        if self.selector is None and self.factorization is None:
            raise ValueError("expected a selector, a factorization or both")
        for axis in AXES:
            ref = getattr(self, axis)
            if isinstance(ref, dict) and len(ref) != 1:
                raise ValueError(f"expected {axis} to be a name or {{name: {{param: value}}}} with one name")
        return self

    def ref(self, axis: str) -> tuple[str, dict[str, Any]] | None:
        ref = getattr(self, axis)
        if ref is None:
            return None
        if isinstance(ref, str):
            return ref, {}
        ((name, params),) = ref.items()
        return name, dict(params or {})

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        parts = []
        for axis in AXES:
            ref = self.ref(axis)
            if ref is not None:
                name, params = ref
                inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
                parts.append(f"{name}[{inner}]" if inner else name)
        return "/".join(parts)


class Select(Strict):
    task: str
    task_params: dict[str, Any] = Field(default_factory=dict)
    metric: str | None = None  # default: the task's primary metric (cells.primary_metric)
    budgets: list[float] | None = Field(default=None, min_length=1)
    higher_is_better: bool | None = None  # only for a metric that records no direction


class Better(Strict):
    kind: Literal["better"]


class Ordering(Strict):
    kind: Literal["ordering"]


class WithinOfDense(Strict):
    kind: Literal["within_of_dense"]
    percent: float = Field(ge=0)


class CompressionAtLoss(Strict):
    kind: Literal["compression_at_loss"]
    compression: float = Field(gt=0)
    loss: float = Field(ge=0)
    loss_kind: Literal["absolute", "relative"]


class RankRecovered(Strict):
    kind: Literal["rank_recovered"]
    percent: float = Field(100.0, gt=0, le=100)


class Rate(Strict):
    kind: Literal["rate"]
    curve: str | None = None
    against: str | None = None
    x: Literal["linear", "log"] = "linear"
    y: Literal["linear", "log"] = "log"
    window: tuple[float, float] = (0.5, 1.0)
    slope: tuple[float | None, float | None]

    @model_validator(mode="after")
    def _check(self) -> Rate:
        if (self.curve is None) == (self.against is None):
            raise ValueError("expected exactly one of curve (a curve's slope) and against (a task parameter)")
        lo, hi = self.window
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"expected window [start, end] with 0 <= start < end <= 1 (got {list(self.window)})")
        if self.slope[0] is None and self.slope[1] is None:
            raise ValueError("expected slope [lo, hi] with at least one bound")
        if None not in self.slope and self.slope[0] > self.slope[1]:
            raise ValueError(f"expected slope [lo, hi] with lo <= hi (got {list(self.slope)})")
        return self


Relation = Annotated[
    Better | Ordering | WithinOfDense | CompressionAtLoss | RankRecovered | Rate, Field(discriminator="kind")
]
RELATION_KINDS = ("better", "ordering", "within_of_dense", "compression_at_loss", "rank_recovered", "rate")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
       "!=": operator.ne}


class Condition(Strict):
    """``metric op value``; ``value`` is a number or the name of another metric of the same cell."""

    metric: str
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: float | str

    def text(self) -> str:
        return f"{self.metric} {self.op} {self.value}"


class Adequacy(Strict):
    min_seeds: int | None = Field(default=None, ge=1)
    dense: list[Condition] = Field(default_factory=list)
    method: list[Condition] = Field(default_factory=list)
    finetuning_beats_pretrained: bool = False


class Claim(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str = Field(min_length=1)
    statement: str = Field(min_length=1)
    suite: str | None = None
    select: Select
    methods: list[MethodRef] = Field(min_length=1)
    relation: Relation
    adequacy: Adequacy = Field(default_factory=Adequacy)

    @field_validator("statement", "source")
    @classmethod
    def _one_line(cls, value: str) -> str:
        value = value.strip()
        if "\n" in value:
            raise ValueError("expected one line of text")
        return value

    @model_validator(mode="after")
    def _check(self) -> Claim:
        kind, n = self.relation.kind, len(self.methods)
        if kind == "better" and n != 2:
            raise ValueError(f"expected exactly two methods for relation better (A better than B; got {n})")
        if kind == "ordering" and n < 2:
            raise ValueError(f"expected at least two methods for relation ordering, best first (got {n})")
        return self


class ClaimsFile(Strict):
    description: str = ""
    claims: list[Claim] = Field(min_length=1)


def _model_at(loc: Sequence, data: Any) -> type[BaseModel] | None:
    """The model that holds the last key of ``loc`` (to list the keys it accepts)."""
    model: type[BaseModel] | None = ClaimsFile
    node = data
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if model is None or part not in model.model_fields:
            continue  # a union tag pydantic put into the location
        annotation = model.model_fields[part].annotation
        node = node.get(part) if isinstance(node, dict) else None
        candidates = _models_in(annotation)
        if part == "relation" and isinstance(node, dict):
            kind = node.get("kind")
            candidates = [m for m in candidates if kind in typing.get_args(m.model_fields["kind"].annotation)]
        model = candidates[0] if len(candidates) == 1 else None
    return model


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _key(loc: Sequence) -> str:
    out, previous = "", None
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in ("float", "int", "str", "bool")):
            continue  # pydantic's name of a union member, not a key of the file
        if previous == "relation" and part in RELATION_KINDS:
            previous = part
            continue  # the discriminator's tag
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        previous = part
    return out


def _message(err: dict, data: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        model = _model_at(err["loc"][:-1], data)
        keys = ", ".join(model.model_fields) if model else "the documented keys"
        return f"expected one of the keys {keys} (unknown key)"
    if kind == "missing":
        return "expected a value (required key is missing)"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        given = err.get("input")
        got = f" (got {given['kind']!r})" if isinstance(given, dict) and "kind" in given else ""
        return f"expected kind to be one of: {', '.join(RELATION_KINDS)}{got}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    text = msg[len("Input should be "):] if msg.startswith("Input should be ") else msg[0].lower() + msg[1:]
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"expected {text}{got}"


def load_claims(path: str | Path) -> list[Claim]:
    """Read and validate a claims file; every problem is a ``ClaimsError`` (``FILE: KEY: expected ...``)."""
    file = str(path)
    try:
        data = read_yaml_mapping(path, "a claims file", "the key claims (a list of claims)")
    except InputFileError as exc:
        raise ClaimsError(file, exc.where, exc.message) from None
    try:
        spec = ClaimsFile.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a misspelt key is reported as unknown rather than as the missing key it was meant to be
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = err["loc"]
        if len(loc) >= 5 and loc[2] == "methods" and isinstance(loc[3], int) and loc[4] in AXES:
            # pydantic reports each branch of a plugin reference (str | {name: params}); say what either must be
            got = data["claims"][loc[1]]["methods"][loc[3]][loc[4]]
            raise ClaimsError(file, _key(loc[:5]), f"expected a plugin name or {{name: {{param: value}}}} "
                                                   f"(got {got!r})") from None
        raise ClaimsError(file, _key(loc), _message(err, data)) from None
    seen: dict[str, int] = {}
    for i, claim in enumerate(spec.claims):
        if claim.id in seen:
            raise ClaimsError(file, f"claims[{i}].id",
                              f"expected a unique id ({claim.id!r} is also claims[{seen[claim.id]}])")
        seen[claim.id] = i
    return spec.claims


# ---------------------------------------------------------------------------------------------------------------------
# Matching claims to cells


def _same(want: Any, have: Any) -> bool:
    """A claim's parameter value against a recorded one (numbers up to rounding; ``5e-5`` written as YAML text too)."""
    if isinstance(want, bool) or isinstance(have, bool):
        return want == have
    if isinstance(want, str) and isinstance(have, (int, float)):
        try:
            want = float(want)
        except ValueError:
            return False
    if isinstance(want, (int, float)) and isinstance(have, (int, float)):
        return math.isclose(float(want), float(have), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        return len(want) == len(have) and all(_same(w, h) for w, h in zip(want, have))
    if isinstance(want, dict) and isinstance(have, dict):
        return _subset(want, have)
    return want == have


def _subset(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    return all(k in have and _same(v, have[k]) for k, v in want.items())


@dataclasses.dataclass
class Configuration:
    """One configuration a claim is judged on: the cells (row labels of the cells frame) of each method and of the
    dense reference of its task configuration."""

    key: tuple
    label: str
    task_params: str
    methods: list[list[int]]  # per method: row indices
    dense: list[int]
    x: float | None = None  # rate against a task parameter: that parameter's value (one per configuration)


@dataclasses.dataclass
class Plan:
    """Which configurations a claim covers in a cells frame, and what is wrong with the selection."""

    configurations: list[Configuration]
    problems: list[str]  # ambiguous methods, methods without cells, ... (empty: the selection is sound)
    missing: list[str]  # methods with no cell at all


def _variant(row: Mapping[str, Any]) -> str:
    return f"{row['selector']}{row['selector_params']}/{row['factorization']}{row['factorization_params']}"


def plan(claim: Claim, cells: pd.DataFrame) -> Plan:
    """Match ``claim`` against a cells frame (columns task, task_params, selector, selector_params, factorization,
    factorization_params, budget, budget_kind, seed; parameters as JSON text as in the results): the
    configurations it covers and the problems of its selection. Used by ``check_claims`` on results and by the
    tests on the cells a shipped suite expands to."""
    sel = claim.select
    cells = cells[cells["task"] == sel.task]
    params = {text: json.loads(text) for text in cells["task_params"].unique()}
    wanted = [text for text, p in params.items() if _subset(sel.task_params, p)]
    cells = cells[cells["task_params"].isin(wanted)]
    reference = cells[cells["selector"] == REFERENCE_SELECTOR]
    named = {axis for m in claim.methods for axis in AXES if m.ref(axis) is not None}
    free = [axis for axis in AXES if axis not in named]
    against = getattr(claim.relation, "against", None)

    def task_key(text: str) -> str:
        if against is None:
            return text
        p = dict(params[text])
        p.pop(against, None)
        return json.dumps(p, sort_keys=True)

    def method_rows(method: MethodRef) -> pd.DataFrame:
        rows = cells
        for axis in AXES:
            ref = method.ref(axis)
            if ref is None:
                continue
            name, want = ref
            rows = rows[rows[axis] == name]
            if want:
                ok = {t: _subset(want, json.loads(t)) for t in rows[f"{axis}_params"].unique()}
                rows = rows.loc[rows[f"{axis}_params"].map(ok).astype(bool)]
        is_reference = (method.ref("selector") or ("",))[0] == REFERENCE_SELECTOR
        if sel.budgets is not None and not is_reference:
            budget = rows["budget"].astype(float).to_numpy()
            keep = np.zeros(len(rows), dtype=bool)
            for b in sel.budgets:
                keep |= np.isclose(budget, b, rtol=1e-9, atol=0)
            rows = rows[keep]
        return rows

    def config_key(row) -> tuple:
        budget = None if pd.isna(row["budget"]) else float(row["budget"])
        kind = None if pd.isna(row["budget_kind"]) else row["budget_kind"]
        key = [task_key(row["task_params"]), kind, budget]
        for axis in free:
            key += [row[axis], row[f"{axis}_params"]]
        if against is not None:
            key.append(row["task_params"])  # one configuration per parameter value; grouped again by the relation
        return tuple(key)

    problems: list[str] = []
    missing: list[str] = []
    per_method: list[dict[tuple, list[int]]] = []
    for method in claim.methods:
        rows = method_rows(method)
        groups: dict[tuple, list[int]] = {}
        for index, row in zip(rows.index, rows.to_dict("records")):
            groups.setdefault(config_key(row), []).append(index)
        if not groups:
            missing.append(method.name)
        per_method.append(groups)
    keys = set(per_method[0]).intersection(*per_method[1:]) if per_method else set()
    if not keys and not missing:
        problems.append("the methods never ran in the same configuration")
    dense_by_task = {t: list(g.index) for t, g in reference.groupby("task_params")}
    for name, groups in zip([m.name for m in claim.methods], per_method):
        for key in keys:
            variants = sorted({_variant(r) for r in cells.loc[groups[key]].to_dict("records")})
            if len(variants) > 1:
                problems.append(f"method {name} matches {len(variants)} variants in one configuration "
                                f"({'; '.join(variants)}): name their parameters")
                break
    problems += [f"no cells for {name}" for name in missing]
    needs_dense = claim.relation.kind in ("within_of_dense", "compression_at_loss") or bool(
        claim.adequacy.dense or claim.adequacy.finetuning_beats_pretrained)

    ordered = sorted(keys, key=lambda k: [(0, p, "") if isinstance(p, float) else (1, 0.0, str(p)) for p in k])
    labels = _labels(sel.task, [k[0] for k in ordered], ordered, free)
    configurations = []
    for key, label in zip(ordered, labels):
        text = key[-1] if against is not None else key[0]
        x = None
        if against is not None:
            value = params[text].get(against)
            x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        configurations.append(Configuration(key, label, text, [groups[key] for groups in per_method],
                                            dense_by_task.get(text, []), x))
        if needs_dense and not configurations[-1].dense:
            problems.append(f"no dense reference for {label}")
    return Plan(configurations, problems, missing)


def _labels(task: str, task_params: list[str], keys: list[tuple], free: list[str]) -> list[str]:
    if not keys:
        return []
    base = results.configuration_labels(pd.Series([task] * len(keys)), pd.Series(task_params))
    axes = [results.configuration_labels(pd.Series([k[3 + 2 * i] for k in keys]),
                                         pd.Series([k[4 + 2 * i] for k in keys]))
            for i in range(len(free))]
    out = []
    for j, (label, key) in enumerate(zip(base, keys)):
        kind, budget = key[1], key[2]
        if budget is not None:
            label += f" @ {kind}={budget:g}"
        for i, axis in enumerate(free):
            if key[3 + 2 * i] not in (REFERENCE_SELECTOR, REFERENCE_FACTORIZATION):
                label += f" {axis}={axes[i][j]}"
        out.append(label)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Results:
    cells: pd.DataFrame  # the newest cell of every configuration, all statuses
    values: dict[str, dict[str, float]]  # cell_id -> metric -> value (ok cells)
    directions: dict[str, bool]  # metric -> higher_is_better, where recorded
    folders: list[str]
    _curves: pd.DataFrame | None = None

    def curves(self) -> pd.DataFrame:
        if self._curves is None:
            frames = [results.read_table(folder, "curves") for folder in self.folders]
            curves = pd.concat(frames, ignore_index=True)
            self._curves = curves[curves["cell_id"].isin(self.cells["cell_id"])]
        return self._curves


def read_folders(folders: Sequence[str | Path]) -> Results:
    """The cells and metrics of several results folders as one (the newest run of a configuration wins)."""
    for folder in folders:
        if not (Path(folder) / "cells").is_dir():
            raise ClaimsError(str(folder), "", "expected a results folder written by `bench run` (no cells/ inside)")
    cells = pd.concat([results.read_table(f, "cells") for f in folders], ignore_index=True)
    cells = results.latest_cells(cells).reset_index(drop=True)
    metrics = pd.concat([results.read_table(f, "metrics") for f in folders], ignore_index=True)
    ok = set(cells.loc[cells["status"] == "ok", "cell_id"])
    metrics = metrics[metrics["cell_id"].isin(ok)]
    values: dict[str, dict[str, float]] = {}
    for cell_id, metric, value in zip(metrics["cell_id"], metrics["metric"], metrics["value"]):
        values.setdefault(cell_id, {})[metric] = float(value)
    directions = {}
    for metric, hib in zip(metrics["metric"], metrics["higher_is_better"]):
        if hib is not None and not pd.isna(hib) and metric not in directions:
            directions[metric] = bool(hib)
    return Results(cells, values, directions, [str(f) for f in folders])


# ---------------------------------------------------------------------------------------------------------------------
# Judging


@dataclasses.dataclass
class Judged:
    """The verdict of one configuration (or one part of it), its one-line text and its numbers."""

    verdict: str
    text: str
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Verdict:
    """The verdict of one claim: ``verdict`` (one of ``VERDICTS``), a short ``text`` with the numbers behind it,
    and ``numbers`` (per configuration: label, verdict, estimates, intervals, seeds)."""

    claim: str
    source: str
    statement: str
    verdict: str
    text: str
    numbers: dict[str, Any]


def combine(parts: Sequence[Judged]) -> str:
    """The aggregation rule (module docstring): contradicted if any part is, else inconclusive (protocol) if any
    part is, else reproduced if all are, else inconclusive (noise); nothing to judge: not run; only excluded
    parts: inconclusive (protocol)."""
    verdicts = [p.verdict for p in parts if p.verdict != NOT_RUN]
    if not verdicts:
        return NOT_RUN
    verdicts = [v for v in verdicts if v != EXCLUDED]
    if not verdicts:
        return PROTOCOL
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if PROTOCOL in verdicts:
        return PROTOCOL
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOISE


def _mean_interval(by_seed: Mapping[int, float]) -> Paired:
    """The mean over seeds of a per-seed quantity with its bootstrap interval (a paired comparison against 0)."""
    return paired_comparison(dict(by_seed), {s: 0.0 for s in by_seed}, higher_is_better=True)


def _bounded(interval: Paired, lo: float | None, hi: float | None) -> str:
    """Whether the mean's interval lies inside [lo, hi] (reproduced), entirely outside (contradicted) or across a
    bound (noise); fewer than MIN_SEEDS seeds: noise."""
    if interval.low is None:
        return NOISE
    if (lo is not None and interval.high < lo) or (hi is not None and interval.low > hi):
        return CONTRADICTED
    if (lo is None or interval.low >= lo) and (hi is None or interval.high <= hi):
        return REPRODUCED
    return NOISE


def _interval_text(p: Paired, digits: int = 3) -> str:
    if p.n == 0 or not math.isfinite(p.difference):
        return "no seeds to compare"
    if p.low is None:
        return f"{p.difference:.{digits}g} (n={p.n}: {TOO_FEW})"
    return f"{p.difference:.{digits}g} [{p.low:.{digits}g}, {p.high:.{digits}g}] (n={p.n})"


def _interval_numbers(p: Paired) -> dict[str, Any]:
    return {"mean": p.difference, "low": p.low, "high": p.high, "n": p.n}


class _Judge:
    def __init__(self, claim: Claim, data: Results):
        self.claim, self.data = claim, data
        self.rows = data.cells

    # -- values ------------------------------------------------------------------------------------------------------

    def ok_rows(self, indices: list[int]) -> pd.DataFrame:
        rows = self.rows.loc[indices]
        return rows[rows["status"] == "ok"]

    def by_seed(self, indices: list[int], metric: str) -> dict[int, float]:
        out = {}
        for cell_id, seed in zip(*(self.ok_rows(indices)[c] for c in ("cell_id", "seed"))):
            value = self.data.values.get(cell_id, {}).get(metric)
            if value is not None and math.isfinite(value):
                out[int(seed)] = value
        return out

    def status_note(self, indices: list[int]) -> str:
        statuses = self.rows.loc[indices, "status"]
        bad = statuses[statuses != "ok"].value_counts()
        return ", ".join(f"{n} {status}" for status, n in bad.items())

    def metric(self, config_rows: list[int]) -> str | None:
        if self.claim.select.metric:
            return self.claim.select.metric
        names = {m for m in self.rows.loc[config_rows, "primary_metric"] if isinstance(m, str) and m}
        return names.pop() if len(names) == 1 else None

    def direction(self, metric: str) -> bool | None:
        if self.claim.select.higher_is_better is not None:
            return self.claim.select.higher_is_better
        return self.data.directions.get(metric)

    # -- adequacy ----------------------------------------------------------------------------------------------------

    def check_condition(self, condition: Condition, indices: list[int], who: str) -> str | None:
        """None when every ok cell of ``indices`` satisfies ``condition``, else what failed."""
        for cell_id, seed in zip(*(self.ok_rows(indices)[c] for c in ("cell_id", "seed"))):
            values = self.data.values.get(cell_id, {})
            left = values.get(condition.metric)
            right = values.get(condition.value) if isinstance(condition.value, str) else condition.value
            if left is None or right is None:
                missing = condition.metric if left is None else condition.value
                return f"{who} records no {missing} (adequacy: {condition.text()})"
            if not OPS[condition.op](left, right):
                named = f"{condition.value} = " if isinstance(condition.value, str) else ""
                return (f"{who}, seed {int(seed)}: {condition.metric} = {left:.4g}, not {condition.op} "
                        f"{named}{right:.4g} (adequacy: {condition.text()})")
        return None

    def adequacy(self, config: Configuration, metric: str | None,
                 groups: list[tuple[str, list[int]]]) -> tuple[str, str] | None:
        """The first adequacy condition that fails in ``config``: (``PROTOCOL`` or ``EXCLUDED``, its text), or
        None."""
        adequacy = self.claim.adequacy
        if adequacy.min_seeds is not None:
            for who, indices in groups:
                n = len(set(self.ok_rows(indices)["seed"]))
                if n < adequacy.min_seeds:
                    note = self.status_note(indices)
                    return PROTOCOL, (f"{who} has {n} ok seed{'s' if n != 1 else ''} (adequacy: at least "
                                      f"{adequacy.min_seeds}){f'; {note}' if note else ''}")
        if adequacy.dense or adequacy.finetuning_beats_pretrained:
            if not len(self.ok_rows(config.dense)):
                return PROTOCOL, "no dense reference to check the adequacy conditions on"
        for condition in adequacy.dense:
            failure = self.check_condition(condition, config.dense, "the dense reference")
            if failure:
                return PROTOCOL, failure
        if adequacy.finetuning_beats_pretrained and metric is not None:
            hib = self.direction(metric)
            op = ">" if hib else "<"
            failure = self.check_condition(Condition(metric=metric, op=op, value=f"{metric}_pretrained"),
                                           config.dense, "the dense reference (full fine-tuning)")
            if failure:
                return EXCLUDED, failure + " (full fine-tuning does not beat the pretrained network: excluded)"
        for condition in adequacy.method:
            for method, indices in zip(self.claim.methods, config.methods):
                failure = self.check_condition(condition, indices, method.name)
                if failure:
                    return PROTOCOL, failure
        return None

    # -- relations ---------------------------------------------------------------------------------------------------

    def better(self, a: list[int], b: list[int], names: tuple[str, str], metric: str, hib: bool) -> Judged:
        av, bv = self.by_seed(a, metric), self.by_seed(b, metric)
        paired = paired_comparison(av, bv, hib)
        verdict = {"win": REPRODUCED, "loss": CONTRADICTED}.get(paired.verdict, NOISE)
        ai, bi = seed_interval(list(av.values())), seed_interval(list(bv.values()))
        text = f"{names[0]} vs {names[1]}: {paired.text() if paired.n else 'no common seeds'}"
        if paired.n < MIN_SEEDS:
            notes = [f"{name}: {note}" for name, note in zip(names, (self.status_note(a), self.status_note(b)))
                     if note]
            text += f" ({'; '.join(notes)})" if notes else ""
        return Judged(verdict, text, {
            "a": names[0], "b": names[1], "a_median": ai.estimate, "b_median": bi.estimate,
            "difference": paired.difference, "low": paired.low, "high": paired.high, "n": paired.n,
            "call": paired.verdict,
        })

    def loss_by_seed(self, indices: list[int], dense: list[int], metric: str, hib: bool, relative: bool) -> dict:
        values, ref = self.by_seed(indices, metric), self.by_seed(dense, metric)
        sign = 1.0 if hib else -1.0
        out = {}
        for seed in sorted(set(values) & set(ref)):
            loss = sign * (ref[seed] - values[seed])
            if relative:
                if ref[seed] == 0:
                    continue
                loss /= abs(ref[seed])
            out[seed] = loss
        return out

    def judge(self, config: Configuration) -> Judged:
        claim, rel = self.claim, self.claim.relation
        names = [m.name for m in claim.methods]
        everything = [i for group in config.methods for i in group] + config.dense
        metric = self.metric(everything)
        if rel.kind not in ("rank_recovered", "rate") and metric is None:
            return Judged(PROTOCOL, "no primary metric recorded for these cells: name select.metric")
        hib = self.direction(metric) if metric else None
        needs_direction = rel.kind in ("better", "ordering", "within_of_dense", "compression_at_loss") or (
            claim.adequacy.finetuning_beats_pretrained)
        if needs_direction and hib is None:
            return Judged(PROTOCOL, f"{metric} records no direction: set select.higher_is_better")
        groups = list(zip(names, config.methods))
        if rel.kind in ("within_of_dense", "compression_at_loss"):
            if not config.dense:
                return Judged(NOT_RUN, "no dense reference for this task configuration")
            groups.append(("the dense reference", config.dense))
        failure = self.adequacy(config, metric, groups)
        if failure:
            status, text = failure
            return Judged(status, text, {"adequacy": text})

        if rel.kind in ("better", "ordering"):
            links = [self.better(config.methods[i], config.methods[i + 1], (names[i], names[i + 1]), metric, hib)
                     for i in range(len(names) - 1)]
            verdict = combine(links)
            shown = [link for link in links if link.verdict == verdict] or links
            return Judged(verdict, "; ".join(link.text for link in shown), {"links": [ln.numbers for ln in links]})

        if rel.kind == "within_of_dense":
            parts = []
            for name, indices in zip(names, config.methods):
                loss = _mean_interval(self.loss_by_seed(indices, config.dense, metric, hib, relative=True))
                verdict = _bounded(loss, None, rel.percent / 100)
                text = f"{name}: {metric} relative loss {_interval_text(loss)}, claimed at most {rel.percent / 100:g}"
                parts.append(Judged(verdict, text, {"method": name, **_interval_numbers(loss)}))
            return Judged(combine(parts), "; ".join(p.text for p in parts), {"parts": [p.numbers for p in parts]})

        if rel.kind == "compression_at_loss":
            parts = []
            for name, indices in zip(names, config.methods):
                ratios = {s: 1.0 / r for s, r in self.by_seed(indices, "param_ratio").items() if r > 0}
                if not ratios and len(self.ok_rows(indices)):
                    parts.append(Judged(PROTOCOL, f"{name}: no param_ratio recorded"))
                    continue
                compression = _mean_interval(ratios)
                loss = _mean_interval(self.loss_by_seed(indices, config.dense, metric, hib,
                                                        relative=rel.loss_kind == "relative"))
                c_verdict = _bounded(compression, rel.compression, None)
                l_verdict = _bounded(loss, None, rel.loss)
                unit = " (relative)" if rel.loss_kind == "relative" else ""
                text = (f"{name}: compression x{_interval_text(compression)}, claimed at least x{rel.compression:g}; "
                        f"{metric} loss{unit} {_interval_text(loss)}, claimed at most {rel.loss:g}")
                parts.append(Judged(combine([Judged(c_verdict, ""), Judged(l_verdict, "")]), text, {
                    "method": name, "compression": _interval_numbers(compression), "compression_verdict": c_verdict,
                    "loss": _interval_numbers(loss), "loss_verdict": l_verdict,
                }))
            return Judged(combine(parts), "; ".join(p.text for p in parts), {"parts": [p.numbers for p in parts]})

        if rel.kind == "rank_recovered":
            parts = []
            for name, indices in zip(names, config.methods):
                selected, true = self.by_seed(indices, "rank_selected"), self.by_seed(indices, "rank_true")
                seeds = sorted(set(selected) & set(true))
                if not seeds:
                    parts.append(Judged(PROTOCOL, f"{name}: no rank_selected / rank_true recorded"))
                    continue
                hits = [s for s in seeds if round(selected[s]) == round(true[s])]
                fraction = len(hits) / len(seeds)
                if len(seeds) < MIN_SEEDS:
                    verdict = NOISE
                else:
                    verdict = REPRODUCED if fraction * 100 >= rel.percent - 1e-9 else CONTRADICTED
                ranks = ", ".join(f"{int(selected[s])}" for s in seeds)
                text = (f"{name}: true rank {int(true[seeds[0]])} recovered in {len(hits)}/{len(seeds)} seeds "
                        f"(ranks {ranks}; claimed at least {rel.percent:g} %)"
                        + (f" ({TOO_FEW})" if len(seeds) < MIN_SEEDS else ""))
                parts.append(Judged(verdict, text, {"method": name, "recovered": len(hits), "n": len(seeds),
                                                    "fraction": fraction, "ranks": [selected[s] for s in seeds]}))
            return Judged(combine(parts), "; ".join(p.text for p in parts), {"parts": [p.numbers for p in parts]})

        assert rel.kind == "rate"
        parts = []
        for name, indices in zip(names, config.methods):
            slopes = self.curve_slopes(indices, rel)
            if not slopes:
                parts.append(Judged(PROTOCOL, f"{name}: no curve {rel.curve!r} with two points in the window"))
                continue
            interval = _mean_interval(slopes)
            verdict = _bounded(interval, *rel.slope)
            text = f"{name}: slope {_interval_text(interval)}, claimed in {_range_text(rel.slope)}"
            parts.append(Judged(verdict, text, {"method": name, **_interval_numbers(interval)}))
        return Judged(combine(parts), "; ".join(p.text for p in parts), {"parts": [p.numbers for p in parts]})

    def curve_slopes(self, indices: list[int], rel: Rate) -> dict[int, float]:
        rows = self.ok_rows(indices)
        curves = self.data.curves()
        curves = curves[curves["cell_id"].isin(rows["cell_id"]) & (curves["curve"] == rel.curve)]
        seeds = dict(zip(rows["cell_id"], rows["seed"]))
        out = {}
        for cell_id, curve in curves.groupby("cell_id"):
            slope = _slope(curve["step"].to_numpy(float), curve["value"].to_numpy(float), rel)
            if slope is not None:
                out[int(seeds[cell_id])] = slope
        return out

    def rate_against(self, configs: list[Configuration]) -> list[tuple[str, Judged]]:
        """``rate`` against a task parameter: configurations that differ in that parameter only are one group; per
        method and seed, the slope of the metric over the parameter's values."""
        rel: Rate = self.claim.relation
        groups: dict[tuple, list[Configuration]] = {}
        for config in configs:
            groups.setdefault(config.key[:-1], []).append(config)
        out = []
        for group in groups.values():
            label = group[0].label
            xs = sorted({c.x for c in group if c.x is not None and math.isfinite(c.x)})
            if len(xs) < 2:
                out.append((label, Judged(PROTOCOL, f"{rel.against} takes {len(xs)} numeric value(s) here; a slope "
                                                    f"needs two")))
                continue
            label = f"{label} over {rel.against} in {', '.join(f'{x:g}' for x in xs)}"
            everything = [i for c in group for m in c.methods for i in m]
            metric = self.metric(everything)
            if metric is None:
                out.append((label, Judged(PROTOCOL, "no primary metric recorded for these cells: name select.metric")))
                continue
            failure = next((f for c in group for f in [self.adequacy(
                c, metric, list(zip([m.name for m in self.claim.methods], c.methods)))] if f), None)
            if failure:
                status, text = failure
                out.append((label, Judged(status, text, {"adequacy": text})))
                continue
            parts = []
            for m, method in enumerate(self.claim.methods):
                points: dict[int, list[tuple[float, float]]] = {}
                for c in group:
                    for seed, value in self.by_seed(c.methods[m], metric).items():
                        points.setdefault(seed, []).append((c.x, value))
                slopes = {}
                for seed, pts in points.items():
                    xv, yv = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
                    slope = _slope(xv, yv, rel, window=False)
                    if slope is not None:
                        slopes[seed] = slope
                interval = _mean_interval(slopes)
                verdict = _bounded(interval, *rel.slope) if slopes else NOT_RUN
                parts.append(Judged(verdict, f"{method.name}: slope {_interval_text(interval)}, claimed in "
                                             f"{_range_text(rel.slope)}",
                                    {"method": method.name, **_interval_numbers(interval)}))
            out.append((label, Judged(combine(parts), "; ".join(p.text for p in parts),
                                      {"parts": [p.numbers for p in parts]})))
        return out


def _range_text(bounds: tuple[float | None, float | None]) -> str:
    lo, hi = bounds
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


def _slope(x: np.ndarray, y: np.ndarray, rel: Rate, window: bool = True) -> float | None:
    """Least-squares slope of y against x (each on its scale), over ``rel.window`` of the x range for curves."""
    order = np.argsort(x)
    x, y = x[order], y[order]
    keep = np.isfinite(x) & np.isfinite(y)
    if window and keep.any():
        lo, hi = x[keep].min(), x[keep].max()
        start, end = lo + rel.window[0] * (hi - lo), lo + rel.window[1] * (hi - lo)
        keep &= (x >= start - 1e-12) & (x <= end + 1e-12)
    if rel.x == "log":
        keep &= x > 0
    if rel.y == "log":
        keep &= y > 0
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        return None
    if rel.x == "log":
        x = np.log10(x)
    if rel.y == "log":
        y = np.log10(y)
    return float(np.polyfit(x, y, 1)[0])


def check_claim(claim: Claim, data: Results) -> Verdict:
    """The verdict of one claim on the results read by ``read_folders``."""
    judge = _Judge(claim, data)
    found = plan(claim, data.cells)
    base = {"metric": claim.select.metric, "relation": claim.relation.kind}
    if not found.configurations:
        why = "; ".join(found.problems) or "no matching results"
        return Verdict(claim.id, claim.source, claim.statement, NOT_RUN, why, {**base, "configurations": []})
    ambiguous = [p for p in found.problems if "variants" in p]
    if ambiguous:
        return Verdict(claim.id, claim.source, claim.statement, PROTOCOL, ambiguous[0],
                       {**base, "problems": found.problems, "configurations": []})
    if claim.relation.kind == "rate" and claim.relation.against is not None:
        judged = judge.rate_against(found.configurations)
    else:
        judged = [(c.label, judge.judge(c)) for c in found.configurations]
    verdict = combine([j for _, j in judged])
    counts = {v: sum(j.verdict == v for _, j in judged) for v in (*VERDICTS, EXCLUDED)}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    shown = [(label, j) for label, j in judged if j.verdict == verdict] or judged
    detail = "; ".join(f"{label}: {j.text}" for label, j in shown[:2])
    more = f" (+{len(shown) - 2} more)" if len(shown) > 2 else ""
    text = f"{len(judged)} configuration{'s' if len(judged) != 1 else ''} ({summary}). {detail}{more}"
    excluded = [(label, j) for label, j in judged if j.verdict == EXCLUDED and (label, j) not in shown[:2]]
    if excluded:
        text += " Excluded: " + "; ".join(f"{label}: {j.text}" for label, j in excluded)
    numbers = {**base, "configurations": [{"configuration": label, "verdict": j.verdict, "text": j.text, **j.numbers}
                                          for label, j in judged]}
    return Verdict(claim.id, claim.source, claim.statement, verdict, text, numbers)


def check_claims(claims: Sequence[Claim], results_dirs: Sequence[str | Path]) -> list[Verdict]:
    """Judge every claim on the union of the results folders (a missing folder is a ``ClaimsError``)."""
    data = read_folders(results_dirs)
    return [check_claim(claim, data) for claim in claims]


def verdict_frame(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """One row per claim: claim, source, verdict, numbers (the verdict's short text)."""
    return pd.DataFrame(
        [{"claim": v.claim, "source": v.source, "verdict": v.verdict, "numbers": v.text} for v in verdicts],
        columns=["claim", "source", "verdict", "numbers"],
    )
