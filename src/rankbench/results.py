"""Tidy results: four Parquet datasets under the output folder, one part file per cell, written atomically.

``DIR/metrics/``  one row per (cell, metric) -- the columns of the README's "Results schema".
``DIR/ranks/``    one row per (cell, site): ``cell_id, site, rank, rank_per_mode, params``.
``DIR/curves/``   one row per (cell, curve, step): e.g. the error against iteration of a recovery solver.
``DIR/cells/``    one row per cell: its full configuration, status, reason, traceback and ``notes`` (a JSON object
                  of text facts such as checksums and fallbacks a method took). Written *last*: a cell counts as
                  finished only when its ``cells`` part exists (HELM's rule), so a crash between files leaves an
                  unfinished cell that the next run redoes.

Each part is written to a hidden temporary file in the same folder, fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX). Readers (pandas, pyarrow, DuckDB) ignore hidden files, so a reader never sees
half a file. Every table has a fixed Arrow schema, so parts always concatenate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rankbench.api import FINAL_STATUSES, CellRecord
from rankbench.cells import Cell
from rankbench.files import atomic_write

CELL_COLUMNS = [
    ("cell_id", pa.string()),
    ("suite", pa.string()),
    ("task", pa.string()),
    ("selector", pa.string()),
    ("factorization", pa.string()),
    ("task_params", pa.string()),
    ("selector_params", pa.string()),
    ("factorization_params", pa.string()),
    ("budget", pa.float64()),
    ("budget_kind", pa.string()),
    ("seed", pa.int64()),
    ("status", pa.string()),
]
RUN_COLUMNS = [("started_at", pa.string()), ("git_sha", pa.string()), ("device", pa.string())]

SCHEMAS = {
    "metrics": pa.schema(
        CELL_COLUMNS
        + [
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("unit", pa.string()),
            ("higher_is_better", pa.bool_()),
            ("reason", pa.string()),
        ]
        + RUN_COLUMNS
    ),
    "ranks": pa.schema(
        [
            ("cell_id", pa.string()),
            ("site", pa.string()),
            ("rank", pa.int64()),
            ("rank_per_mode", pa.string()),
            ("params", pa.int64()),
        ]
    ),
    "curves": pa.schema(
        [("cell_id", pa.string()), ("curve", pa.string()), ("step", pa.float64()), ("value", pa.float64())]
    ),
    "cells": pa.schema(
        CELL_COLUMNS
        + [
            ("config_key", pa.string()),
            ("primary_metric", pa.string()),
            ("versions", pa.string()),
            ("reason", pa.string()),
            ("traceback", pa.string()),
            ("wall_s", pa.float64()),
            ("notes", pa.string()),  # JSON object of text facts (CellContext.note)
        ]
        + RUN_COLUMNS
    ),
}
TABLES = tuple(SCHEMAS)


def _write_atomic(table: pa.Table, folder: Path, cell_id: str) -> None:
    atomic_write(folder / f"part-{cell_id}.parquet", lambda handle: pq.write_table(table, handle))


def _cell_fields(cell: Cell, status: str) -> dict:
    return {
        "cell_id": cell.cell_id,
        "suite": cell.suite,
        "task": cell.task,
        "selector": cell.selector,
        "factorization": cell.factorization,
        "task_params": json.dumps(cell.task_params, sort_keys=True),
        "selector_params": json.dumps(cell.selector_params, sort_keys=True),
        "factorization_params": json.dumps(cell.factorization_params, sort_keys=True),
        "budget": cell.budget,
        "budget_kind": cell.budget_kind,
        "seed": cell.seed,
        "status": status,
    }


def write_cell(out: Path, cell: Cell, record: CellRecord, run: dict, primary_metric: str = "") -> None:
    """Write one finished cell: metrics, ranks, curves, then the ``cells`` marker."""
    out = Path(out)
    base = _cell_fields(cell, record.status)
    run_fields = {
        "started_at": record.started_at,
        "git_sha": run.get("git_sha", ""),
        "device": run.get("device", cell.device),
    }
    metrics = [
        {
            **base,
            **m,
            "unit": m.get("unit", ""),
            "higher_is_better": m.get("higher_is_better"),
            "reason": record.reason,
            **run_fields,
        }
        for m in record.metrics
    ]
    rows = {
        "metrics": metrics,
        "ranks": [{"cell_id": cell.cell_id, **r} for r in record.ranks],
        "curves": [{"cell_id": cell.cell_id, **c} for c in record.curves],
    }
    for name, table_rows in rows.items():
        part = out / name / f"part-{cell.cell_id}.parquet"
        if table_rows:
            _write_atomic(pa.Table.from_pylist(table_rows, schema=SCHEMAS[name]), out / name, cell.cell_id)
        elif part.exists():  # a retried cell that no longer has rows of this kind
            part.unlink()
    marker = {
        **base,
        "config_key": cell.config_key,
        "primary_metric": primary_metric,
        "versions": json.dumps(cell.versions, sort_keys=True),
        "reason": record.reason,
        "traceback": record.traceback,
        "wall_s": record.wall_s,
        "notes": json.dumps(record.notes, sort_keys=True),
        **run_fields,
    }
    _write_atomic(pa.Table.from_pylist([marker], schema=SCHEMAS["cells"]), out / "cells", cell.cell_id)


def read_marker(out: str | Path, cell_id: str) -> dict | None:
    """The ``cells`` row of one cell as a dict, or None when that cell has no part file (yet)."""
    part = Path(out) / "cells" / f"part-{cell_id}.parquet"
    try:
        rows = pq.read_table(part, schema=SCHEMAS["cells"]).to_pylist()
    except (OSError, pa.ArrowInvalid):  # missing, or unreadable
        return None
    return rows[0] if rows else None


def is_written(out: str | Path, record: CellRecord) -> bool:
    """Whether ``record`` itself is already on disk: its cell's marker has the record's ``started_at`` and status.

    Executors whose jobs write their own part files (``submitit``, ``ray``) hand the host records that are already
    written; the host acknowledges them instead of writing them a second time."""
    marker = read_marker(out, record.cell_id)
    return marker is not None and marker["started_at"] == record.started_at and marker["status"] == record.status


def read_table(out: str | Path, name: str) -> pd.DataFrame:
    """One table of a results folder as a DataFrame (empty, with the right columns, if there is none)."""
    folder = Path(out) / name
    if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
        return SCHEMAS[name].empty_table().to_pandas()
    return pq.read_table(folder, schema=SCHEMAS[name]).to_pandas()


def cell_statuses(out: str | Path) -> dict[str, str]:
    folder = Path(out) / "cells"
    if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
        return {}
    table = pq.read_table(folder, schema=SCHEMAS["cells"], columns=["cell_id", "status"])
    return dict(zip(table.column("cell_id").to_pylist(), table.column("status").to_pylist()))


def finished_cell_ids(out: str | Path) -> set[str]:
    return {cid for cid, status in cell_statuses(out).items() if status in FINAL_STATUSES}


def read_results(out: str | Path, latest_only: bool = True) -> pd.DataFrame:
    """The metrics of a results folder as one tidy DataFrame, restricted to finished cells.

    With ``latest_only`` a configuration that was re-run after a plugin changed (same ``config_key``, new
    ``cell_id``) contributes only its newest cell.
    """
    cells = read_table(out, "cells")
    metrics = read_table(out, "metrics")
    if latest_only:
        cells = latest_cells(cells)
    metrics = metrics[metrics["cell_id"].isin(cells["cell_id"])]
    return metrics.reset_index(drop=True)


def latest_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The newest cell of every configuration (``config_key``): a configuration re-run after a plugin changed (new
    ``cell_id``) counts once, as its latest run."""
    if cells.empty:
        return cells
    return cells.sort_values("started_at").drop_duplicates("config_key", keep="last")


def configuration_labels(names: pd.Series, params: pd.Series) -> list[str]:
    """Short labels for (plugin name, parameters as JSON) pairs: the name plus only the parameters that vary between
    the configurations of that plugin among the pairs given (defaults are spelled out in the results, so showing
    all of them is noise), e.g. ``pinn[pde="poisson", target=2]``. One label per pair, in order."""
    pairs = list(zip(names, params))
    labels: dict[tuple[str, str], str] = {}
    for name in dict.fromkeys(n for n, _ in pairs):
        configs = {text: json.loads(text) for n, text in dict.fromkeys(pairs) if n == name}
        fields = sorted({k for p in configs.values() for k in p})
        varying = [k for k in fields if len({json.dumps(p.get(k), sort_keys=True) for p in configs.values()}) > 1]
        for text, p in configs.items():
            inner = ", ".join(f"{k}={json.dumps(p.get(k))}" for k in varying)
            labels[(name, text)] = f"{name}[{inner}]" if inner else name
    return [labels[pair] for pair in pairs]
