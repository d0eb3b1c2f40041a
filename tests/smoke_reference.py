"""The metrics of ``suites/smoke.yaml`` that must not change when code changes without meaning to change a result.

``tests/data/smoke_metrics.csv`` holds every deterministic metric of every ok cell of a one-thread run of the suite
(times, latencies, memory peaks and work counters are left out). ``test_e2e.py`` runs the suite with
``--threads 1`` and compares its metrics with these, within the tolerances below:

* same cell, same kept parameters: every metric within ``RTOL`` relative (continuous metrics) -- except
  ``accuracy``, which may move by ``ACCURACY_ATOL`` (a few test images when round-off differs across CPUs);
* kept parameters that differ: only within ``PARAMS_RTOL``. A selector that thresholds a spectrum (EVBMF, OHT) may
  move one site's rank by one component when a decomposition's precision changes the spectrum below 1e-5, which
  changes that cell's other metrics by more than round-off; such cells are listed, not failed.

Regenerate after an intended change of results, and say so in the commit:
``bench run suites/smoke.yaml --threads 1 --out /tmp/smoke && python tests/smoke_reference.py /tmp/smoke``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

REFERENCE = Path(__file__).parent / "data" / "smoke_metrics.csv"
KEY = ["task", "task_params", "selector", "factorization", "budget_kind", "budget", "seed", "metric"]
CELL = KEY[:-1]
NOT_DETERMINISTIC = r"time_|seconds_to_tol|latency_ms|peak_|work_"
RTOL, ACCURACY_ATOL, PARAMS_RTOL = 1e-3, 0.01, 1e-3


def deterministic_metrics(results_dir: Path) -> pd.DataFrame:
    metrics = pd.read_parquet(Path(results_dir) / "metrics")
    metrics = metrics[(metrics["status"] == "ok") & ~metrics["metric"].str.match(NOT_DETERMINISTIC)]
    table = metrics[KEY + ["value"]].copy()
    table["budget"] = table["budget"].map(_budget_text)
    table["budget_kind"] = table["budget_kind"].fillna("none")
    table = table.astype({"seed": int}).sort_values(KEY).reset_index(drop=True)
    if table.duplicated(KEY).any():
        raise ValueError("two cells of the suite differ only in plugin parameters: the key needs them")
    return table


def _budget_text(value) -> str:
    return "none" if value is None or value != value else f"{float(value):g}"


def differences(results_dir: Path) -> tuple[list[str], list[str]]:
    """(failures, cells whose kept parameters moved) of a smoke run against the reference."""
    reference = pd.read_csv(REFERENCE, dtype={"task_params": str, "budget": str, "budget_kind": str},
                            keep_default_na=False)
    got = deterministic_metrics(results_dir)
    joined = reference.merge(got, on=KEY, how="outer", suffixes=("_ref", "_got"), indicator=True)
    failures = [f"missing: {row.task} {row.selector}+{row.factorization} {row.metric}"
                for row in joined[joined["_merge"] == "left_only"].itertuples()]
    failures += [f"new metric: {row.task} {row.selector}+{row.factorization} {row.metric} (regenerate the reference)"
                 for row in joined[joined["_merge"] == "right_only"].itertuples()]
    both = joined[joined["_merge"] == "both"]
    params = both[both["metric"] == "params"]
    moved = params[~np.isclose(params["value_got"], params["value_ref"], rtol=0, atol=0)]
    moved_cells = set(map(tuple, moved[CELL].to_numpy()))
    notes = []
    for row in both.itertuples():
        cell = tuple(getattr(row, c) for c in CELL)
        a, b = row.value_ref, row.value_got
        what = f"{row.task} {row.selector}+{row.factorization} @{row.budget} seed {row.seed}: {row.metric} {a!r} -> {b!r}"
        if cell in moved_cells:
            if row.metric in ("params", "param_ratio") and not np.isclose(b, a, rtol=PARAMS_RTOL, atol=0):
                failures.append(what)
            elif row.metric == "params":
                notes.append(what)
            continue
        tolerance = {"atol": ACCURACY_ATOL, "rtol": 0} if row.metric == "accuracy" else {"atol": 1e-12, "rtol": RTOL}
        if not np.isclose(b, a, equal_nan=True, **tolerance):
            failures.append(what)
    return failures, notes


if __name__ == "__main__":
    deterministic_metrics(Path(sys.argv[1])).to_csv(REFERENCE, index=False, float_format="%.17g")
    print(f"wrote {REFERENCE}")
