"""What the scale-out executors (``submitit``, ``ray``) share: the function their jobs run, and the host's view of
the part files those jobs write.

A job gets cells as JSON and the settings of ``job_settings`` (no live objects: it may run on another machine). It
rebuilds the plugin registry from ``plugins_dir`` like the ``subprocess`` executor's worker does (once per process:
Ray reuses its worker processes, so a registry and a task's warm set-up outlive one task), runs each cell with
``execute_cell`` (SIGALRM at the cell's limit), and writes the cell's part files into the results folder itself with the project's
atomic writer -- so a finished cell survives a ``bench`` host that dies, and a re-run (with any executor) resumes
from it. It returns the records too; the host sees that they are already on disk (``results.is_written``) and
does not write them again. A job that cannot write (no shared file system) leaves the writing to the host.

When a job dies or is killed, the host asks the disk which of its cells were finished meanwhile (``PartWatch``):
those are acknowledged from their part files; only the rest become ``timeout``/``crashed`` records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


from rankbench.api import CellRecord
from rankbench.cells import Cell

_RUNTIMES: dict[tuple, Any] = {}  # per job process: settings -> Runtime (registry loaded once)
REASON_CHARS = 4000  # a dead job's reason quotes its log: keep the cells table readable


def job_settings(runtime, threads: int | None = None) -> dict[str, Any]:
    """Everything a job needs besides its cells, as plain data."""
    return {
        "plugins_dir": runtime.plugins_dir,
        "device": runtime.device,
        "timeout": runtime.timeout,
        "threads": runtime.threads or threads,
        "deterministic": runtime.deterministic,  # bench run --deterministic
        "results_dir": runtime.results_dir,
        "run_info": dict(runtime.run_info),
        # the cache folder, the plugin filter: a job on another node or in a reused worker must see the host's
        "env": {k: v for k, v in os.environ.items() if k.startswith("RANKBENCH_")},
    }


def _runtime(settings: dict[str, Any]):
    from rankbench.runner import worker_runtime

    deterministic = bool(settings.get("deterministic", False))
    key = (settings["plugins_dir"], settings["device"], settings["timeout"], settings["threads"],
           settings["env"].get("RANKBENCH_LOAD_PLUGINS"), deterministic)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one warm runtime per process
        _RUNTIMES[key] = worker_runtime(settings["plugins_dir"], settings["device"], settings["timeout"],
                                        settings["threads"], deterministic)
    return _RUNTIMES[key]


def run_job(cells: list[str], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The job: run the cells one after another in this process, write each one's parts as soon as it ends, and
    return the records (as dicts). Never raises because a cell failed."""
    from rankbench import results
    from rankbench.runner import primary_metric

    for name in [n for n in os.environ if n.startswith("RANKBENCH_") and n not in settings["env"]]:
        del os.environ[name]  # a reused worker process: what an earlier job set must not leak into this one
    os.environ.update(settings["env"])
    runtime = _runtime(settings)
    out = []
    for text in cells:
        cell = Cell.from_json(text)
        record = runtime.execute(cell, alarm=True)
        if settings["results_dir"]:
            try:
                results.write_cell(
                    settings["results_dir"], cell, record, settings["run_info"],
                    primary_metric(runtime.registry, cell, record),
                )
            except Exception:  # noqa: BLE001 -- not shared with the host, read-only, full: the host writes it
                pass
        out.append(dataclasses.asdict(record))
    return out


class PartWatch:
    """The host's snapshot of the results folder's markers, to tell which cells a dead job finished meanwhile."""

    def __init__(self, results_dir: str | None):
        from rankbench import results

        self.results_dir = results_dir
        self.before: dict[str, str] = {}
        if results_dir:
            scan = results.scan_results(results_dir)
            self.before = {cell_id: marker["started_at"] for cell_id, marker in scan.markers.items()}

    def written_since(self, cell: Cell) -> CellRecord | None:
        """The record of ``cell`` that a job wrote after the snapshot, rebuilt from its marker; else None."""
        from rankbench import results

        if not self.results_dir:
            return None
        marker = results.read_marker(self.results_dir, cell.cell_id)
        if marker is None or marker["started_at"] == self.before.get(cell.cell_id):
            return None
        return CellRecord(
            cell_id=cell.cell_id,
            status=marker["status"],
            reason=marker["reason"] or "",
            traceback=marker["traceback"] or "",
            started_at=marker["started_at"],
            wall_s=marker["wall_s"] or 0.0,
            primary_metric=marker["primary_metric"] or "",
            notes=json.loads(marker["notes"] or "{}"),
        )


def short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS // 2] + "\n[...]\n" + text[-REASON_CHARS // 2 :]
