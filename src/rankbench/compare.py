"""``bench compare A B``: what changed between two results folders (two commits, two machines), beyond noise.

Matching
--------
Cells are matched by their *configuration*, never by ``cell_id`` (ids fold in plugin code hashes, so they differ
between commits). The key is (task, task_params, selector, selector_params, factorization, factorization_params,
budget, budget_kind). Left out of the key on purpose:

* ``seed``: the seeds of one configuration are its repeats. Each side is summarised by the median over its seeds,
  the spread over seeds gives the noise estimate, and the table says how many seeds each side had.
* ``suite``: the same configuration run from two suites is the same measurement (``config_key`` ignores it too).
* ``device``: comparing two machines is a use case; ``bench run`` writes one device per folder in practice.

Within one folder a configuration re-run after a plugin changed keeps only its newest cell (as ``read_results``).
Only ``ok`` cells are compared; a configuration with no ``ok`` cell on one side is listed as present in only one
side, with the other side's status (``missing``, ``error``, ...). That is reported, not an error.

Metric kinds and default thresholds (relative; ``--threshold KIND=FRACTION`` overrides)
---------------------------------------------------------------------------------------
* ``time``     ``time_*_s``, ``wall_s``, ``latency_*``, ``*_ms``, unit ``s``/``ms``: 100 %. Measured: five repeats of
  the nightly slice (without SmolLM2) on this 2-core machine moved a cell's times by 15 % (median) and 109 % (90th
  percentile) at the same seed; only a doubling is a signal here. Lower it on a dedicated machine.
* ``memory``   ``peak_*_mb``, unit ``MiB``/``MB``: 30 %. The same repeats moved peaks by 4 % (median) and up to 30 %.
* ``quality``  the task's primary metric and every metric with ``higher_is_better`` set: 2 %. Seeded quality
  metrics repeated bit for bit in those five repeats (as did sizes), so a small threshold catches real changes;
  the spread over seeds (median 22 % over three seeds) is the noise band that guards the rest.
* ``size``     ``params``, ``param_ratio``, ``*_params``, ``rank*`` and ``sum_site_ranks`` (derived here from the
  ranks table): 0 (exact, up to 1e-9 relative). At a fixed budget the size a method ends with is deterministic; any
  change means the method behaves differently. Size has no good or bad direction, so a change is ``changed``.
* ``other``    anything else (token counts, iteration counts, ...): 5 %, asv's default ``regressions_thresholds``.

Noise rule
----------
The noise band of one (configuration, metric) is the *larger of the two sides' ranges over seeds* (max - min).
With the 1-5 seeds a suite usually has, the range is the honest robust choice: the median absolute deviation of
two or three values is degenerate (it is 0 or a single difference), and requiring the change of medians to exceed
the whole seed-to-seed spread of either side keeps false alarms rare. With one seed per side there is no noise
estimate and the threshold alone decides (the seed counts are shown).

Two more rules keep noise from being called a change:

* **Time floor.** A time whose medians are below ``TIME_FLOOR_S`` (10 ms) on *both* sides is noise, whatever the
  ratio: two runs of identical cells moved ``time_setup_s`` from 5 us to 1 ms (x196) -- timer resolution, caches
  and scheduling, not the code. Such a change is ``within noise`` (``note``: the floor); 50 ms -> 500 ms is judged
  as usual.
* **Paired over seeds.** For quality metrics with at least 3 seeds on each side, B is compared with A seed by seed
  (``stats.paired_comparison``: the mean of the per-seed differences and its bootstrap interval; columns
  ``paired_verdict``: ``win`` = B better, ``tie``, ``loss`` = B worse, and ``paired``). A change beyond the
  threshold and the range whose paired call is a ``tie`` (the per-seed differences straddle 0) is ``within
  noise``, not a regression or an improvement.

Scale
-----
When every value of a (configuration, metric) on both sides is positive, changes, thresholds and noise are measured
as log ratios: the change is ``ln(B/A)`` (of the medians), the threshold ``ln(1 + t)`` and the noise the larger of
``ln(max/min)`` per side. This is asv's rule (worse when ``B > A (1 + t)``, better when ``B < A / (1 + t)``) and it
stays meaningful for quantities spanning orders of magnitude (a compressed model's perplexity can be 1e7, where
differences are meaningless and percentages are lopsided: x2 is +100 % but /2 is -50 %). Otherwise (a zero or negative
value, e.g. the dense reference's ``rel_error`` of 0) the linear difference is used, with the threshold
``t * |A|`` and the noise the larger linear range. The table shows the relative change ``B/A - 1`` (as a ratio
``xR`` beyond x10 or /10) and the absolute change ``B - A``.

Verdicts
--------
``regression`` / ``improvement``: the change exceeds both the threshold and the noise band and goes in the bad / good
direction (``higher_is_better``; time and memory are lower-is-better). ``changed``: beyond both, but the metric has
no direction (sizes, counts). ``within noise``: beyond the threshold but not the noise band, or below the time
floor, or a paired tie (the ``note`` column says which of the last two). ``unchanged``: inside the threshold.
Metrics reported on only one side are ``only in A`` / ``only in B``.

Exit code: 1 when a metric of a kind named in ``--fail-on`` (default ``quality``) regressed -- or, for a metric
without a direction, changed -- or, with ``quality`` among them, when a configuration that ran in A fails in B
(error, timeout, crash: its quality is lost altogether); 0 otherwise.

Outputs, in ``--out`` (default ``B/compare-vs-<name of A>/``), each written atomically: ``compare.csv`` (every
compared metric with its verdict), ``unmatched.csv`` (configurations in only one side) and ``compare.png``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rankbench import results, stats
from rankbench.files import atomic_write

EXIT_OK, EXIT_FAILED = 0, 1  # as in rankbench.cli; bad input (exit 2) is raised as CompareInputError


class CompareInputError(Exception):
    """Bad input (a folder that is not results, a bad option): ``bench`` prints the message and exits 2."""


KINDS = ("quality", "time", "memory", "size", "other")
DEFAULT_THRESHOLDS = {"quality": 0.02, "time": 1.0, "memory": 0.3, "size": 0.0, "other": 0.05}
DEFAULT_FAIL_ON = ("quality",)
TIME_FLOOR_S = 0.010  # a time below this on both sides (medians) is noise, never a regression
FLOOR_NOTE = f"below the {TIME_FLOOR_S * 1000:g} ms time floor on both sides"
PAIRED_TIE_NOTE = "paired over seeds: tie"
KEY = [
    "task",
    "task_params",
    "selector",
    "selector_params",
    "factorization",
    "factorization_params",
    "budget",
    "budget_kind",
]
SUM_RANKS = "sum_site_ranks"
VERDICT_ORDER = ["regression", "improvement", "changed", "only in A", "only in B", "within noise", "unchanged"]
_TOL = 1e-9  # relative (or log) tolerance under which a difference is float noise

_TIME = re.compile(r"time_.*_s|wall_s|.*_seconds|seconds_.*|latency.*|.*_ms")
_MEMORY = re.compile(r"peak_.*|.*_mb|.*_mib")
_SIZE = re.compile(r"params|param_ratio|.*_params|rank.*|" + SUM_RANKS)


def metric_kind(name: str, unit: str = "", higher_is_better=None, primary: bool = False) -> str:
    """The kind of a metric: time, memory, quality, size or other (see the module docstring)."""
    if _TIME.fullmatch(name) or unit in ("s", "ms"):
        return "time"
    if _MEMORY.fullmatch(name) or unit in ("MiB", "MB", "GiB", "GB"):
        return "memory"
    if primary or higher_is_better is not None and not pd.isna(higher_is_better):
        return "quality"
    if _SIZE.fullmatch(name):
        return "size"
    return "other"


# --------------------------------------------------------------------------------------------------- arguments


def parse_thresholds(items: list[str] | None) -> dict[str, float]:
    """``["quality=0.05", "time=0.2,memory=0.3"]`` -> the default thresholds with those replaced."""
    thresholds = dict(DEFAULT_THRESHOLDS)
    for item in items or []:
        for part in filter(None, (p.strip() for p in item.split(","))):
            kind, sep, value = part.partition("=")
            try:
                number = float(value) if sep else float("nan")
            except ValueError:
                number = float("nan")
            if kind.strip() not in KINDS or not math.isfinite(number) or number < 0:
                raise CompareInputError(
                    f"--threshold: expected KIND=FRACTION with KIND one of {', '.join(KINDS)} and FRACTION a "
                    f"number >= 0, e.g. quality=0.05 (got {part!r})"
                )
            thresholds[kind.strip()] = number
    return thresholds


def parse_fail_on(value: str | None) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_FAIL_ON
    kinds = tuple(filter(None, (p.strip() for p in value.split(","))))
    if kinds == ("none",):
        return ()
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise CompareInputError(
            f"--fail-on: expected a comma-separated list of {', '.join(KINDS)} (or none), got {value!r}"
        )
    return kinds


# --------------------------------------------------------------------------------------------------- loading


@dataclass
class Side:
    path: Path
    values: pd.DataFrame  # one row per (ok cell, metric): KEY, seed, metric, value, unit, higher_is_better, primary
    statuses: pd.DataFrame  # one row per configuration: KEY, status ("ok" if any ok cell, else the others joined)
    git_shas: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)


def _canonical_json(text) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)) or text == "":
        return "{}"
    return json.dumps(json.loads(text), sort_keys=True)


def _key_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Normalise the configuration columns so they compare as plain strings across folders."""
    frame = frame.copy()
    for column in ("task_params", "selector_params", "factorization_params"):
        frame[column] = frame[column].map(_canonical_json)
    frame["budget"] = frame["budget"].map(lambda b: "" if pd.isna(b) else f"{float(b):.12g}")
    frame["budget_kind"] = frame["budget_kind"].fillna("").astype(str)
    return frame


def load_side(path: str | Path, label: str) -> Side:
    path = Path(path)
    if not path.exists():
        raise CompareInputError(
            f"{label} {str(path)!r}: folder not found (expected a results folder written by `bench run`)"
        )
    if not path.is_dir() or not any((path / "cells").glob("part-*.parquet")):
        raise CompareInputError(
            f"{label} {str(path)!r}: expected a results folder written by `bench run` (no cells/part-*.parquet inside)"
        )
    try:
        scan = results.verified_scan(path)  # damaged cells are left out, with one warning
        cells = results.read_table(path, "cells", scan)
        metrics = results.read_table(path, "metrics", scan)
        ranks = results.read_table(path, "ranks", scan)
        cells = _key_columns(results.latest_cells(cells))
    except Exception as exc:  # a damaged or foreign Parquet file: bad input, not a crash
        raise CompareInputError(
            f"{label} {str(path)!r}: cannot read the results tables ({type(exc).__name__}: {exc})"
        ) from None
    if cells.empty:
        raise CompareInputError(f"{label} {str(path)!r}: expected a results folder with finished cells (no finished "
                                f"cells; {len(scan.damaged)} damaged: `bench check-results {path}`)")

    ok = cells[cells["status"] == "ok"]
    by_key = cells.groupby(KEY, sort=False)["status"]
    statuses = by_key.agg(lambda s: "ok" if (s == "ok").any() else "/".join(sorted(set(s)))).reset_index()

    metrics = metrics[metrics["cell_id"].isin(ok["cell_id"])][
        ["cell_id", "metric", "value", "unit", "higher_is_better"]
    ]
    rank_sums = ranks[ranks["cell_id"].isin(ok["cell_id"])].groupby("cell_id")["rank"].sum()
    if len(rank_sums):
        derived = pd.DataFrame(
            {
                "cell_id": rank_sums.index,
                "metric": SUM_RANKS,
                "value": rank_sums.to_numpy(dtype=float),
                "unit": "",
                "higher_is_better": None,
            }
        )
        metrics = pd.concat([metrics, derived], ignore_index=True)
    values = metrics.merge(ok[["cell_id", "seed", "primary_metric", *KEY]], on="cell_id")
    values = values[np.isfinite(values["value"].astype(float))]
    values = values.assign(primary=values["metric"] == values["primary_metric"])
    return Side(
        path=path,
        values=values.drop(columns=["primary_metric"]),
        statuses=statuses,
        git_shas=sorted({s for s in cells["git_sha"].dropna() if s}),
        devices=sorted({d for d in cells["device"].dropna() if d}),
    )


# --------------------------------------------------------------------------------------------------- comparing


def _first_valid(series: pd.Series):
    valid = series.dropna()
    return valid.iloc[0] if len(valid) else None


def _summarise(values: pd.DataFrame) -> pd.DataFrame:
    grouped = values.groupby([*KEY, "metric"], sort=False)
    return pd.DataFrame(
        {
            "median": grouped["value"].median(),
            "min": grouped["value"].min(),
            "max": grouped["value"].max(),
            "seeds": grouped["value"].count(),
            "unit": grouped["unit"].first(),
            "higher_is_better": grouped["higher_is_better"].agg(_first_valid),
            "primary": grouped["primary"].any(),
        }
    )


def judge(a: dict, b: dict, threshold: float, direction: int, floor: float | None = None,
          paired: str | None = None) -> dict:
    """Compare the seed summaries of one (configuration, metric): ``a``/``b`` have median, min and max.

    ``floor`` (times, in the metric's unit): medians below it on both sides are noise. ``paired``: the verdict of
    the paired comparison over seeds (``stats.paired_comparison``), where there is one; a ``tie`` is noise. Either
    turns a change beyond the threshold into ``within noise``, with a ``note`` saying why."""
    if min(a["min"], b["min"]) > 0:
        scale = "log"
        change = math.log(b["median"] / a["median"])
        limit = math.log1p(threshold)
        noise = max(math.log(a["max"] / a["min"]), math.log(b["max"] / b["min"]))
        tol = _TOL
    else:
        scale = "linear"
        change = b["median"] - a["median"]
        limit = threshold * abs(a["median"])
        noise = max(a["max"] - a["min"], b["max"] - b["min"])
        tol = 1e-12 + _TOL * max(abs(a["median"]), abs(b["median"]))
    if abs(change) <= limit + tol:
        verdict = "unchanged"
    elif abs(change) <= noise + tol:
        verdict = "within noise"
    elif direction == 0:
        verdict = "changed"
    else:
        verdict = "improvement" if change * direction > 0 else "regression"
    note = ""
    if verdict != "unchanged" and floor is not None and max(abs(a["median"]), abs(b["median"])) < floor:
        verdict, note = "within noise", FLOOR_NOTE
    elif verdict in ("regression", "improvement", "changed") and paired == stats.TIE:
        verdict, note = "within noise", PAIRED_TIE_NOTE
    return {"scale": scale, "change": change, "limit": limit, "noise": noise, "verdict": verdict, "note": note}


def time_floor(metric: str, unit: str) -> float:
    """``TIME_FLOOR_S`` in the unit of a time metric (``ms`` by unit or name, seconds otherwise)."""
    return TIME_FLOOR_S * 1000 if unit == "ms" or metric.endswith("_ms") else TIME_FLOOR_S


def _seed_values(values: pd.DataFrame) -> dict[tuple, dict[int, float]]:
    """{(configuration key..., metric): {seed: value}} (a seed recorded twice counts once, as its median)."""
    medians = values.groupby([*KEY, "metric", "seed"], sort=False)["value"].median()
    by_key: dict[tuple, dict[int, float]] = {}
    for (*key, seed), value in medians.items():
        by_key.setdefault(tuple(key), {})[int(seed)] = float(value)
    return by_key


def _bool_or_none(value) -> bool | None:
    return None if value is None or pd.isna(value) else bool(value)


def _relative(a: float, b: float) -> float:
    if a == 0:
        return 0.0 if b == 0 else math.copysign(math.inf, b)
    return b / a - 1.0


def _add_labels(frame: pd.DataFrame, all_keys: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame.assign(task_label=pd.Series(dtype=str), method=pd.Series(dtype=str))

    def column(name: str, params: str) -> list[str]:
        keys = all_keys[[name, params]].drop_duplicates()
        labels = dict(zip(zip(keys[name], keys[params]), results.configuration_labels(keys[name], keys[params])))
        return [labels[key] for key in zip(frame[name], frame[params])]

    selector, factorization = column("selector", "selector_params"), column("factorization", "factorization_params")
    return frame.assign(
        task_label=column("task", "task_params"), method=[f"{s} + {f}" for s, f in zip(selector, factorization)]
    )


@dataclass
class Comparison:
    a: Side
    b: Side
    rows: pd.DataFrame  # one row per (configuration, metric) present on either side
    unmatched: pd.DataFrame  # configurations with ok cells on one side only
    thresholds: dict[str, float]

    def failing(self, fail_on) -> pd.DataFrame:
        bad = self.rows["verdict"].isin(["regression", "changed"]) & self.rows["kind"].isin(list(fail_on))
        return self.rows[bad]

    def broken(self) -> pd.DataFrame:
        """Configurations that ran in A and fail in B (error, timeout, crash...): their quality is lost altogether."""
        u = self.unmatched
        return u[(u["status_a"] == "ok") & ~u["status_b"].isin(["ok", "missing"])]


def compare(a: str | Path, b: str | Path, thresholds: dict[str, float] | None = None) -> Comparison:
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    side_a, side_b = load_side(a, "A"), load_side(b, "B")
    sum_a, sum_b = _summarise(side_a.values), _summarise(side_b.values)
    joined = sum_a.merge(sum_b, how="outer", left_index=True, right_index=True, suffixes=("_a", "_b")).reset_index()

    # configurations (not metrics) with ok cells on one side only
    ok_a = side_a.statuses[side_a.statuses["status"] == "ok"]
    ok_b = side_b.statuses[side_b.statuses["status"] == "ok"]
    both = ok_a[KEY].merge(ok_b[KEY], on=KEY)
    statuses = side_a.statuses.merge(side_b.statuses, on=KEY, how="outer", suffixes=("_a", "_b"))
    statuses[["status_a", "status_b"]] = statuses[["status_a", "status_b"]].fillna("missing")
    one_side = statuses[(statuses["status_a"] == "ok") != (statuses["status_b"] == "ok")]
    seeds = {
        side: values.groupby(KEY)["seed"].nunique().rename(f"seeds_{side}").reset_index()
        for side, values in (("a", side_a.values), ("b", side_b.values))
    }
    for side in ("a", "b"):
        one_side = one_side.merge(seeds[side], on=KEY, how="left")
    joined = joined.merge(both, on=KEY)  # metrics of configurations compared on both sides

    all_keys = pd.concat([side_a.statuses[KEY], side_b.statuses[KEY]]).drop_duplicates()
    seeds_a, seeds_b = _seed_values(side_a.values), _seed_values(side_b.values)
    records = []
    for row in joined.to_dict("records"):
        present_a, present_b = not pd.isna(row["median_a"]), not pd.isna(row["median_b"])
        hib = _bool_or_none(row["higher_is_better_a"])
        if hib is None:
            hib = _bool_or_none(row["higher_is_better_b"])
        unit = row["unit_a"] if present_a else row["unit_b"]
        primary = bool(row["primary_a"] if present_a else False) or bool(row["primary_b"] if present_b else False)
        kind = metric_kind(row["metric"], unit or "", hib, primary)
        direction = 1 if hib is True else -1 if hib is False else -1 if kind in ("time", "memory") else 0
        record = {
            **{k: row[k] for k in KEY},
            "metric": row["metric"],
            "kind": kind,
            "unit": unit,
            "better": {1: "higher", -1: "lower"}.get(direction, ""),
            "threshold": thresholds[kind],
        }
        for side in ("a", "b"):
            for stat in ("median", "min", "max", "seeds"):
                record[f"{stat}_{side}"] = row[f"{stat}_{side}"]
        if present_a and present_b:
            a = {s: float(row[f"{s}_a"]) for s in ("median", "min", "max")}
            b = {s: float(row[f"{s}_b"]) for s in ("median", "min", "max")}
            paired = None
            if kind == "quality" and direction and min(row["seeds_a"], row["seeds_b"]) >= stats.MIN_SEEDS:
                key = (*(row[k] for k in KEY), row["metric"])
                paired = stats.paired_comparison(seeds_b[key], seeds_a[key], higher_is_better=direction == 1)
                record["paired_verdict"], record["paired"] = paired.verdict, paired.text()
            floor = time_floor(row["metric"], unit or "") if kind == "time" else None
            record.update(judge(a, b, thresholds[kind], direction, floor, paired.verdict if paired else None))
            record["change_abs"] = b["median"] - a["median"]
            record["change_rel"] = _relative(a["median"], b["median"])
        else:
            record["verdict"] = "only in A" if present_a else "only in B"
        records.append(record)
    columns = [*KEY, "metric", "kind", "unit", "better", "threshold", "median_a", "min_a", "max_a", "seeds_a",
               "median_b", "min_b", "max_b", "seeds_b", "change_abs", "change_rel", "scale", "change", "limit",
               "noise", "paired_verdict", "paired", "verdict", "note"]  # fmt: skip
    rows = pd.DataFrame(records, columns=columns)
    rows[["paired_verdict", "paired", "note"]] = rows[["paired_verdict", "paired", "note"]].fillna("")
    rows = _add_labels(rows, all_keys)
    if not rows.empty:
        rows["_order"] = rows["verdict"].map(VERDICT_ORDER.index)
        rows["_kind"] = rows["kind"].map(KINDS.index)
        rows["_size"] = -pd.to_numeric(rows["change"], errors="coerce").abs().fillna(0)
        rows = rows.sort_values(["_order", "_kind", "_size", "task_label", "method", "budget", "metric"])
        rows = rows.drop(columns=["_order", "_kind", "_size"]).reset_index(drop=True)
    unmatched = _add_labels(one_side.reset_index(drop=True), all_keys)
    return Comparison(side_a, side_b, rows, unmatched, thresholds)


# --------------------------------------------------------------------------------------------------- output


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}"


def _fmt_rel(rel: float) -> str:
    if math.isnan(rel):
        return ""
    if math.isinf(rel):
        return "new nonzero"
    if rel + 1 >= 10 or 0 < rel + 1 <= 0.1:  # orders of magnitude: a ratio reads better than a percentage
        return f"x{rel + 1:.3g}"
    return f"{100 * rel:+.2f}%"


def _fmt_band(row) -> str:
    """The noise band as a relative width where there is one."""
    if row["scale"] == "log":
        return f"±{100 * math.expm1(row['noise']):.2f}%"
    if row["median_a"]:
        return f"±{100 * row['noise'] / abs(row['median_a']):.2f}%"
    return f"±{row['noise']:.3g}"


def _budget(row) -> str:
    return row["budget"] + (f" ({row['budget_kind']})" if row["budget_kind"] else "") if row["budget"] else ""


def _seeds(value) -> str:
    return "0" if pd.isna(value) else str(int(value))


def format_report(cmp: Comparison) -> str:
    from tabulate import tabulate

    def side_line(name: str, side: Side) -> str:
        sha = ", ".join(s[:12] for s in side.git_shas) or "unknown commit"
        return f"{name}: {side.path} ({sha}; {', '.join(side.devices) or 'unknown device'})"

    lines = [side_line("A", cmp.a), side_line("B", cmp.b)]
    lines.append(
        "thresholds: "
        + ", ".join(f"{k} {100 * v:g}%" for k, v in cmp.thresholds.items())
        + "; noise band: the larger range over seeds of A and B"
        + f"; times below {TIME_FLOOR_S * 1000:g} ms on both sides are noise (floor)"
        + f"; quality with >= {stats.MIN_SEEDS} seeds a side: a tie paired over seeds is noise"
    )
    shown = cmp.rows[cmp.rows["verdict"].isin(["regression", "improvement", "changed"])]
    if len(shown):
        table = [
            [
                r["verdict"],
                r["kind"],
                r["task_label"],
                r["method"],
                _budget(r),
                r["metric"],
                _fmt(r["median_a"]),
                _fmt(r["median_b"]),
                f"{r['change_abs']:+.4g}",
                _fmt_rel(r["change_rel"]),
                _fmt_band(r),
                f"{_seeds(r['seeds_a'])}/{_seeds(r['seeds_b'])}",
                r["paired"],
            ]
            for r in shown.to_dict("records")
        ]
        headers = ["verdict", "kind", "task", "method", "budget", "metric", "A (median)", "B (median)",
                   "B - A", "change", "noise", "seeds A/B", "B vs A paired over seeds"]  # fmt: skip
        lines += ["", tabulate(table, headers=headers)]
    if len(cmp.unmatched):
        table = [
            [r["task_label"], r["method"], _budget(r), f"{r['status_a']} ({_seeds(r['seeds_a'])} seeds)"
             if r["status_a"] == "ok" else r["status_a"], f"{r['status_b']} ({_seeds(r['seeds_b'])} seeds)"
             if r["status_b"] == "ok" else r["status_b"]]
            for r in cmp.unmatched.to_dict("records")
        ]  # fmt: skip
        lines += ["", "configurations with ok cells in only one side:"]
        lines += [tabulate(table, headers=["task", "method", "budget", "A", "B"])]
    counts = cmp.rows["verdict"].value_counts()
    configs = len(cmp.rows[KEY].drop_duplicates()) if len(cmp.rows) else 0
    summary = (
        f"{counts.get('regression', 0)} regressions, {counts.get('improvement', 0)} improvements, "
        f"{counts.get('changed', 0)} changed; "
        f"{counts.get('unchanged', 0) + counts.get('within noise', 0)} unchanged "
        f"({counts.get('within noise', 0)} of them beyond the threshold but within the seed noise"
        + "".join(
            f"; {n} {what}"
            for n, what in (
                ((cmp.rows["note"] == FLOOR_NOTE).sum(), f"times below the {TIME_FLOOR_S * 1000:g} ms floor"),
                ((cmp.rows["note"] == PAIRED_TIE_NOTE).sum(), "quality changes that tie paired over seeds"),
            )
            if n
        )
        + f") over {configs} configurations matched"
    )
    only_metric = counts.get("only in A", 0) + counts.get("only in B", 0)
    if only_metric:
        summary += f"; {only_metric} metrics reported on one side only"
    if len(cmp.unmatched):
        summary += f"; {len(cmp.unmatched)} configurations in only one side"
    lines += ["", summary]
    return "\n".join(lines)


VERDICT_COLOURS = {
    "regression": "#d62728",
    "improvement": "#2ca02c",
    "changed": "#ff7f0e",
    "within noise": "#7f7f7f",
    "unchanged": "#bbbbbb",
}


def plot(cmp: Comparison, path: Path) -> bool:
    """Per metric (x), one dot per configuration at B/A (log axis); shaded: the metric kind's threshold band; grey
    bar behind each dot: that configuration's noise band. Rows on the linear scale with A <= 0 are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.patches import Patch

    data = cmp.rows[cmp.rows["verdict"].isin(VERDICT_COLOURS)].copy()
    if data.empty:
        return False
    data["ratio"] = data["change_rel"].astype(float) + 1.0
    data = data[np.isfinite(data["ratio"]) & (data["ratio"] > 0)]
    if data.empty:
        return False
    metrics = data[["kind", "metric"]].drop_duplicates()
    metrics = metrics.assign(_k=metrics["kind"].map(KINDS.index)).sort_values(["_k", "metric"])
    names = metrics["metric"].tolist()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2.5), 5.0))
    rng = np.random.default_rng(0)
    for i, (metric, kind) in enumerate(zip(names, metrics["kind"])):
        t = cmp.thresholds[kind]
        ax.fill_between([i - 0.4, i + 0.4], 1 / (1 + t), 1 + t, color="#9ecae1", alpha=0.5, linewidth=0)
        sub = data[data["metric"] == metric]
        x = i + rng.uniform(-0.25, 0.25, len(sub))
        # the noise band around "no change", in the comparison's scale
        low = np.where(sub["scale"] == "log", np.exp(-sub["noise"]), 1 - sub["noise"] / sub["median_a"].abs())
        high = np.where(sub["scale"] == "log", np.exp(sub["noise"]), 1 + sub["noise"] / sub["median_a"].abs())
        ax.vlines(x, np.clip(low, 1e-12, None), high, color="#999999", alpha=0.35, linewidth=4)
        ax.scatter(x, sub["ratio"], c=sub["verdict"].map(VERDICT_COLOURS), s=22, zorder=3, edgecolors="none")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 1 / 1.5), max(high, 1.5))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{m}\n({k})" for m, k in zip(names, metrics["kind"])], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("B / A (median over seeds; log scale)")
    ax.set_title(f"{cmp.b.path.name} vs {cmp.a.path.name}", fontsize=9)
    handles = [Patch(color="#9ecae1", alpha=0.5, label="threshold band"),
               Patch(color="#999999", alpha=0.35, label="noise band (per configuration)")]  # fmt: skip
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=v)
        for v, c in VERDICT_COLOURS.items()
        if (data["verdict"] == v).any()
    ]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return True


CSV_COLUMNS = ["verdict", "note", "kind", "task_label", "method", "budget", "budget_kind", "metric", "unit", "better",
               "median_a", "min_a", "max_a", "seeds_a", "median_b", "min_b", "max_b", "seeds_b", "change_abs",
               "change_rel", "scale", "change", "limit", "noise", "threshold", "paired_verdict", "paired", "task", "task_params", "selector",
               "selector_params", "factorization", "factorization_params"]  # fmt: skip


def write_outputs(cmp: Comparison, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    csv = out / "compare.csv"
    atomic_write(csv, cmp.rows[CSV_COLUMNS].to_csv(index=False))
    written.append(csv)
    unmatched = out / "unmatched.csv"
    columns = ["task_label", "method", "status_a", "seeds_a", "status_b", "seeds_b", *KEY]
    atomic_write(unmatched, cmp.unmatched.reindex(columns=columns).to_csv(index=False))
    written.append(unmatched)
    png = out / "compare.png"
    if plot(cmp, png):
        written.append(png)
    elif png.exists():  # a stale plot from an earlier comparison
        png.unlink()
    return written


def run(args) -> int:
    """The ``bench compare`` command: every input is checked before anything is written."""
    thresholds = parse_thresholds(args.threshold)
    fail_on = parse_fail_on(args.fail_on)
    out = Path(args.out) if args.out else Path(args.b) / f"compare-vs-{Path(args.a).resolve().name}"
    if out.exists() and not out.is_dir():
        raise CompareInputError(f"--out: expected a folder (got the file {str(out)!r})")
    cmp = compare(args.a, args.b, thresholds)
    print(format_report(cmp))
    written = write_outputs(cmp, out)
    print(f"written: {', '.join(str(p) for p in written)}")
    failing = cmp.failing(fail_on)
    broken = cmp.broken() if "quality" in fail_on else cmp.unmatched.iloc[:0]
    if len(failing):
        what = "regressed" + (" or changed" if (failing["verdict"] == "changed").any() else "")
        print(
            f"FAILED: {len(failing)} {'/'.join(fail_on)} metrics {what} beyond the threshold and the seed noise "
            f"(--fail-on {','.join(fail_on)})"
        )
    if len(broken):
        print(f"FAILED: {len(broken)} configurations ran in A and fail in B ({', '.join(sorted(set(broken['status_b'])))})")
    return EXIT_FAILED if len(failing) or len(broken) else EXIT_OK
