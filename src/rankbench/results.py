"""Tidy results: four Parquet datasets under the output folder, one part file per cell, written atomically.

``DIR/metrics/``  one row per (cell, metric) -- the columns of the README's "Results schema".
``DIR/ranks/``    one row per (cell, site): ``cell_id, site, rank, rank_per_mode, params``.
``DIR/curves/``   one row per (cell, curve, step): e.g. the error against iteration of a recovery solver.
``DIR/cells/``    one row per cell: its full configuration, status, reason, traceback and ``notes`` (a JSON object
                  of text facts such as checksums and fallbacks a method took) and ``parts`` (for each of the
                  cell's metrics / ranks / curves parts: its row count and SHA-256). Written *last*: a cell counts
                  as finished only when its ``cells`` part exists (HELM's rule), so a crash between files leaves an
                  unfinished cell that the next run redoes.

Verification. A cell is trusted only when its marker reads as one row of its own cell and every part the marker
lists exists with the listed SHA-256 (``scan_results``; the row count is recorded for readers' convenience). A damaged cell -- a truncated, emptied or
deleted part or marker, from a full disk, an interrupted copy or half an rsync -- is left out of every reader with
one warning per folder, re-run by ``bench run`` and listed by ``bench check-results``. Markers written before
``parts`` existed are trusted when their parts can be opened.

Each part is written to a hidden temporary file in the same folder, fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX). Readers (pandas, pyarrow, DuckDB) ignore hidden files, so a reader never sees
half a file. Every table has a fixed Arrow schema, so parts always concatenate.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from rankbench.api import FINAL_STATUSES, CellRecord
from rankbench.cells import Cell
from rankbench.files import atomic_write, cut

if TYPE_CHECKING:
    import pandas as pd

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
            ("parts", pa.string()),  # JSON: {table: {"rows": n, "sha256": hex}} of the cell's other parts
        ]
        + RUN_COLUMNS
    ),
}
TABLES = tuple(SCHEMAS)
DATA_TABLES = ("metrics", "ranks", "curves")


def _write_atomic(table: pa.Table, folder: Path, cell_id: str) -> dict:
    """Write one part; returns what the marker records to verify it: its row count and SHA-256."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    content = buffer.getvalue()
    atomic_write(folder / f"part-{cell_id}.parquet", content)
    return {"rows": table.num_rows, "sha256": hashlib.sha256(content).hexdigest()}


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
        "device": cell.device or run.get("device", ""),  # where the cell ran (auto may keep a small task on the cpu)
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
    parts = {}
    for name, table_rows in rows.items():
        part = out / name / f"part-{cell.cell_id}.parquet"
        if table_rows:
            parts[name] = _write_atomic(pa.Table.from_pylist(table_rows, schema=SCHEMAS[name]), out / name,
                                        cell.cell_id)
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
        "parts": json.dumps(parts, sort_keys=True),
        **run_fields,
    }
    _write_atomic(pa.Table.from_pylist([marker], schema=SCHEMAS["cells"]), out / "cells", cell.cell_id)


def read_marker(out: str | Path, cell_id: str) -> dict | None:
    """The ``cells`` row of one cell as a dict, or None when that cell has no readable marker (yet)."""
    return _read_marker_file(Path(out) / "cells" / f"part-{cell_id}.parquet", cell_id)[0]


def is_written(out: str | Path, record: CellRecord) -> bool:
    """Whether ``record`` itself is already on disk: its cell's marker has the record's ``started_at`` and status.

    Executors whose jobs write their own part files (``submitit``, ``ray``) hand the host records that are already
    written; the host acknowledges them instead of writing them a second time."""
    marker = read_marker(out, record.cell_id)
    return marker is not None and marker["started_at"] == record.started_at and marker["status"] == record.status


def _read_marker_file(path: Path, cell_id: str) -> tuple[dict | None, str]:
    try:
        # ParquetFile, not read_table: the latter goes through pyarrow.dataset, which imports pandas (~0.4 s per
        # command); columns a marker predates read as None
        with pq.ParquetFile(path) as handle:
            rows = [{column: row.get(column) for column in SCHEMAS["cells"].names} for row in handle.read().to_pylist()]
    except FileNotFoundError:
        return None, "no marker"
    except (OSError, pa.ArrowException) as exc:
        return None, f"cells marker unreadable ({_short(exc)})"
    if len(rows) != 1 or rows[0]["cell_id"] != cell_id:
        return None, f"cells marker holds {len(rows)} rows, expected this cell's one"
    return rows[0], ""


def _short(exc: BaseException) -> str:
    return cut(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 100)


def part_problem(out: Path, name: str, cell_id: str, expected: dict | None) -> str:
    """Why part ``name`` of a cell cannot be trusted ("" when it verifies). ``expected``: the marker's record of it
    (None for markers written before records: the part need only open)."""
    path = out / name / f"part-{cell_id}.parquet"
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return f"{name} part missing"
    except OSError as exc:
        return f"{name} part unreadable ({_short(exc)})"
    if expected is None:
        try:
            pq.read_metadata(pa.BufferReader(content))
        except pa.ArrowException as exc:
            return f"{name} part damaged ({_short(exc)})"
        return ""
    if hashlib.sha256(content).hexdigest() != expected.get("sha256"):
        return f"{name} part damaged (checksum differs from the marker's; {len(content)} bytes)"
    return ""


@dataclass
class ResultsScan:
    """What a results folder holds: the verified markers by cell id and, by cell id, why a cell is damaged."""

    folder: Path
    markers: dict[str, dict] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)

    def part_files(self, name: str) -> list[str]:
        """The ``name`` parts of the verified cells."""
        files = []
        for cell_id, marker in self.markers.items():
            listed = marker["_parts"]
            if (name in listed) if listed is not None else (self.folder / name / f"part-{cell_id}.parquet").exists():
                files.append(str(self.folder / name / f"part-{cell_id}.parquet"))
        return files


def scan_results(out: str | Path) -> ResultsScan:
    """Verify every cell of a results folder (module docstring): its marker, then each part the marker lists."""
    scan = ResultsScan(Path(out))
    folder = scan.folder / "cells"
    if not folder.is_dir():
        return scan
    for path in sorted(folder.glob("part-*.parquet")):
        cell_id = path.name[len("part-"):-len(".parquet")]
        marker, problem = _read_marker_file(path, cell_id)
        if marker is None:
            scan.damaged[cell_id] = problem
            continue
        try:
            listed = None if marker.get("parts") is None else json.loads(marker["parts"])
        except ValueError:
            scan.damaged[cell_id] = "cells marker damaged (parts record is not JSON)"
            continue
        if listed is None:
            problems = [part_problem(scan.folder, name, cell_id, None) for name in DATA_TABLES
                        if (scan.folder / name / f"part-{cell_id}.parquet").exists()]
        else:
            problems = [part_problem(scan.folder, name, cell_id, listed[name]) for name in listed]
        problems = [p for p in problems if p]
        if problems:
            scan.damaged[cell_id] = "; ".join(problems)
            continue
        marker["_parts"] = listed
        scan.markers[cell_id] = marker
    return scan


_WARNED: set[tuple[str, int]] = set()
_SCANS: dict[str, tuple[tuple, ResultsScan]] = {}  # folder -> (signature of its part files, scan)


def _signature(folder: Path) -> tuple:
    """(name, size, mtime) of every part file: what a scan depends on, read by stat alone."""
    entries = []
    for table in TABLES:
        try:
            with os.scandir(folder / table) as it:
                entries.extend((table, e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it
                               if e.name.startswith("part-"))
        except FileNotFoundError:
            pass
    return tuple(sorted(entries))


def verified_scan(out: str | Path) -> ResultsScan:
    """``scan_results`` for readers: damaged cells are warned about once per folder (on stderr) and left out. A
    report reads several tables of one folder: the scan (every part hashed) is reused while no part file's size or
    modification time changed."""
    folder = str(Path(out).resolve())
    signature = _signature(Path(folder))
    cached = _SCANS.get(folder)
    if cached is not None and cached[0] == signature:
        scan = cached[1]
    else:
        scan = scan_results(out)
        _SCANS[folder] = (signature, scan)
    key = (folder, len(scan.damaged))
    if scan.damaged and key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {out}: {len(scan.damaged)} damaged cell(s) left out (`bench check-results {out}` lists "
              f"them; `bench run` re-runs them)", file=sys.stderr)
    return scan


def read_table(out: str | Path, name: str, scan: ResultsScan | None = None) -> pd.DataFrame:
    """One table of a results folder as a DataFrame, verified cells only (empty, with the right columns, if there
    is none)."""
    scan = scan or verified_scan(out)
    if name == "cells":
        rows = [{k: v for k, v in m.items() if k != "_parts"} for m in scan.markers.values()]
        return pa.Table.from_pylist(rows, schema=SCHEMAS["cells"]).to_pandas()
    files = scan.part_files(name)
    if not files:
        return SCHEMAS[name].empty_table().to_pandas()
    import pyarrow.dataset as ds

    return ds.dataset(files, schema=SCHEMAS[name], format="parquet").to_table().to_pandas()


def cell_statuses(out: str | Path, scan: ResultsScan | None = None) -> dict[str, str]:
    """Status of every verified cell (damaged cells are absent: they are not finished)."""
    scan = scan or scan_results(out)
    return {cell_id: marker["status"] for cell_id, marker in scan.markers.items()}


def finished_cell_ids(out: str | Path, scan: ResultsScan | None = None) -> set[str]:
    return {cid for cid, status in cell_statuses(out, scan).items() if status in FINAL_STATUSES}


def read_results(out: str | Path, latest_only: bool = True, include_failed: bool = False) -> pd.DataFrame:
    """The metrics of a results folder as one tidy DataFrame: finished cells whose files verify, by default only
    those that ended ``ok`` (``include_failed``: also error / timeout / crashed / oom / skipped cells' rows).

    With ``latest_only`` a configuration that was re-run after a plugin changed (same ``config_key``, new
    ``cell_id``) contributes only its newest cell.
    """
    scan = verified_scan(out)
    cells = read_table(out, "cells", scan)
    metrics = read_table(out, "metrics", scan)
    if latest_only:
        cells = latest_cells(cells)
    if not include_failed:
        cells = cells[cells["status"] == "ok"]
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
