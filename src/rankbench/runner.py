"""The runner: resume, execution of one cell, statuses, and the loop that writes every finished cell at once.

Statuses: ``ok``; ``skipped`` (incompatible pair, with the reason); ``error`` (an exception, traceback stored);
``timeout`` (killed at the per-cell limit); ``crashed`` (the worker process died: segfault, ``os._exit``, SIGKILL,
the kernel's OOM killer); ``diverged`` (non-finite metrics or a plugin's ``Diverged``); ``oom`` (``MemoryError`` or
CUDA out-of-memory). ``ok`` and ``skipped`` are final; the others are retried by the next run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import sys
import signal
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankbench import results, stopping
from rankbench.api import CellFailure, CellRecord
from rankbench.cells import Cell
from rankbench.context import CellContext
from rankbench.files import CACHE_ENV, atomic_write, cache_root  # noqa: F401 (cache_root, CACHE_ENV: part of the runner's API)
from rankbench.kinds import run_cell
from rankbench.measure import peak_rss_mb, reset_peak_rss
from rankbench.plugins import Registry


class CellTimeout(BaseException):
    """Raised in-process by the alarm at the per-cell limit (a BaseException, so ``except Exception`` in a plugin
    cannot swallow it)."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators. ``torch.manual_seed`` seeds the CPU generator and, through
    ``torch.cuda.manual_seed_all``, the default generator of every CUDA device (queued until CUDA initialises)."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")  # the values cuBLAS is reproducible with (CUDA >= 10.2)


def use_deterministic_torch() -> None:
    """``bench run --deterministic`` in a process that runs cells: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless it
    already holds a reproducible value), ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic
    implementation then raises, and its cell is an ``error``, instead of varying silently),
    ``torch.backends.cudnn.deterministic = True`` and ``torch.backends.cudnn.benchmark = False``. cuBLAS reads the
    variable when CUDA creates its handles, so this must run before CUDA initialises: ``bench run`` calls it before
    ``envinfo.environment`` asks CUDA for the device name, a worker before it loads plugins, and ``execute_cell``
    before ``init_cuda``. Seeds need nothing more (``_seed_everything`` seeds the CUDA generators too)."""
    if os.environ.get(CUBLAS_WORKSPACE_ENV) not in DETERMINISTIC_CUBLAS_WORKSPACES:
        os.environ[CUBLAS_WORKSPACE_ENV] = DETERMINISTIC_CUBLAS_WORKSPACES[0]
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def init_cuda(device: str) -> None:
    """Initialise CUDA in this process (and select ``cuda:N`` where the device names one) before a CUDA cell's first
    phase. ``measure`` reads CUDA memory only once CUDA is initialised (it never initialises it itself), so without
    this the first cells of a process -- those before anything touched CUDA -- would have no ``peak_cuda_mb``.
    Once per process: later calls find CUDA initialised."""
    import torch

    if torch.cuda.is_initialized():
        return
    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)
    torch.cuda.init()


@dataclasses.dataclass
class Runtime:
    """What an executor needs: device, per-cell limit, how a worker rebuilds the registry, and ``execute``."""

    registry: Registry
    device: str
    timeout: float | None
    plugins_dir: str | None = None
    threads: int | None = None  # torch CPU threads of the process that runs cells
    deterministic: bool = False  # bench run --deterministic: ``use_deterministic_torch`` where cells run
    shared: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # task_key -> shared store
    tasks: dict[str, Any] = dataclasses.field(default_factory=dict)  # task_key -> task instance
    # Set by ``run_cells``: the results folder and the run fields of every part, for executors whose jobs write
    # their cells' part files themselves (``submitit``, ``ray``); None when the executor is driven directly.
    results_dir: str | None = None
    run_info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def execute(self, cell: Cell, alarm: bool = False) -> CellRecord:
        return execute_cell(cell, self, alarm=alarm)


def worker_runtime(plugins_dir: str | None, device: str, timeout: float | None, threads: int | None,
                   deterministic: bool = False) -> Runtime:
    """The runtime of a process that runs cells for a host (the subprocess worker, a submitit or Ray job): it
    applies ``--deterministic`` (before anything can initialise CUDA), rebuilds the plugin registry and sets the
    torch CPU threads."""
    from rankbench.plugins import load_plugins

    if deterministic:
        use_deterministic_torch()
    elif "torch" in sys.modules:  # a reused process (a Ray worker) whose earlier job was deterministic
        import torch

        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return Runtime(registry=load_plugins(plugins_dir), device=device, timeout=timeout, plugins_dir=plugins_dir,
                   threads=threads, deterministic=deterministic)


def execute_cell(cell: Cell, runtime: Runtime, alarm: bool = False) -> CellRecord:
    """Run one cell in this process and turn whatever happens into a ``CellRecord`` (never raises, except
    the user's stop, see ``rankbench.stopping``). With ``alarm`` the per-cell limit is enforced by SIGALRM (main thread only)."""
    registry = runtime.registry
    if cell.task_key not in runtime.shared:
        # Cells arrive grouped by task configuration: free the previous configuration's models and statistics.
        runtime.shared.clear()
        runtime.tasks.clear()
    ctx = CellContext(
        cell_id=cell.cell_id,
        seed=cell.cell_seed,
        task_seed=cell.task_seed,
        device=cell.device,
        budget=cell.budget,
        budget_kind=cell.budget_kind,
        shared=runtime.shared.setdefault(cell.task_key, {}),
        cache_dir=cache_root() / cell.task,
    )
    started_at, start = now(), time.perf_counter()
    status, reason, trace = "ok", "", ""
    use_alarm = alarm and cell.timeout and threading.current_thread() is threading.main_thread()

    def on_alarm(signum, frame):
        raise CellTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    rss_reset = reset_peak_rss()
    try:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, cell.timeout)
        if runtime.deterministic:
            use_deterministic_torch()
        if cell.device.startswith("cuda"):
            init_cuda(cell.device)  # before the first phase, so that every phase reads its CUDA peak
        _seed_everything(cell.cell_seed)
        task = runtime.tasks.get(cell.task_key)
        if task is None:
            info = registry.get("task", cell.task)
            task = info.cls(info.cls.Params.model_validate(cell.task_params))
            runtime.tasks[cell.task_key] = task
        selector = factorization = None
        if not cell.is_reference:
            sel_info = registry.get("selector", cell.selector)
            fac_info = registry.get("factorization", cell.factorization)
            selector = sel_info.cls(sel_info.cls.Params.model_validate(cell.selector_params))
            factorization = fac_info.cls(fac_info.cls.Params.model_validate(cell.factorization_params))
        run_cell(task, ctx, selector, factorization, kind=cell.problem_kind)  # through the kind's protocol
        if not ctx.quality_is_finite():
            bad = [m["metric"] for m in ctx.metrics if not np.isfinite(m["value"])]
            status, reason = "diverged", f"non-finite metrics: {', '.join(bad)}"
    except CellTimeout:
        status, reason = "timeout", f"cell exceeded its limit of {cell.timeout:g} s (in-process alarm)"
    except CellFailure as exc:
        status, reason, trace = exc.status, str(exc), traceback.format_exc()
    except KeyboardInterrupt as exc:
        if stopping.by_user():  # the user's Ctrl-C / SIGTERM: stop the run
            raise
        status = "error"  # raised by the plugin itself: a failed cell, not the user's stop
        reason, trace = f"KeyboardInterrupt raised by the cell's code ({exc})", traceback.format_exc()
    except BaseException as exc:  # SystemExit from a plugin is a failed cell too
        status = "oom" if _is_oom(exc) else "error"
        reason, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    wall = time.perf_counter() - start
    measured = [
        {"metric": f"time_{phase}_s", "value": seconds, "unit": "s", "higher_is_better": False}
        for phase, seconds in ctx.timer.seconds.items()
    ]
    measured.append({"metric": "time_total_s", "value": wall, "unit": "s", "higher_is_better": False})
    measured.append({"metric": "peak_rss_mb", "value": peak_rss_mb(), "unit": "MiB", "higher_is_better": False})
    if not rss_reset:
        reason = (reason + "; " if reason else "") + "peak_rss_mb is the process lifetime peak"
    if ctx.timer.cuda_peak_mb:
        measured.append(
            {
                "metric": "peak_cuda_mb",
                "value": max(ctx.timer.cuda_peak_mb.values()),
                "unit": "MiB",
                "higher_is_better": False,
            }
        )
    return CellRecord(
        cell_id=cell.cell_id,
        status=status,
        reason=reason,
        traceback=trace,
        metrics=ctx.metrics + measured,
        ranks=ctx.ranks_rows,
        curves=ctx.curve_rows,
        notes=ctx.notes,
        started_at=started_at,
        wall_s=wall,
        primary_metric=str(getattr(runtime.tasks.get(cell.task_key), "primary_metric", "")),
    )


def failed_record(cell: Cell, status: str, reason: str, wall: float = 0.0, started_at: str | None = None) -> CellRecord:
    """A record for a cell that produced nothing itself (skipped, timed out, crashed)."""
    return CellRecord(
        cell_id=cell.cell_id,
        status=status,
        reason=reason,
        metrics=[{"metric": "time_total_s", "value": wall, "unit": "s", "higher_is_better": False}],
        started_at=started_at or now(),
        wall_s=wall,
    )


def primary_metric(registry: Registry, cell: Cell, record: CellRecord | None = None) -> str:
    """The task's primary metric for a cell's marker: the record's (the task instance knew it), else the class's."""
    if record is not None and record.primary_metric:
        return record.primary_metric
    value = getattr(registry.get("task", cell.task).cls, "primary_metric", "")
    return value if isinstance(value, str) else ""  # a property: only the instance knows


def order_for_sharing(cells: Sequence[Cell]) -> list[Cell]:
    """Group cells of one task configuration and seed together so shared work is reused while it is warm."""
    first_seen: dict[tuple, int] = {}
    for i, cell in enumerate(cells):
        first_seen.setdefault((cell.task_key, cell.seed), i)
    return sorted(cells, key=lambda c: (first_seen[(c.task_key, c.seed)], not c.is_reference))


def write_run_info(out: Path, env: dict, suite_path: str, argv: dict) -> Path:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = runs / f"{stamp}-{os.getpid()}.json"
    atomic_write(path, json.dumps({"suite": suite_path, "arguments": argv, "environment": env}, indent=2, default=str))
    return path


def summarize(out: Path, cells: Sequence[Cell], scan: results.ResultsScan | None = None) -> dict[str, int]:
    statuses = results.cell_statuses(out, scan)
    counts: dict[str, int] = {}
    for cell in cells:
        status = statuses.get(cell.cell_id, "not run")
        counts[status] = counts.get(status, 0) + 1
    return counts


def pending_cells(cells: Sequence[Cell], out: Path) -> tuple[list[Cell], results.ResultsScan]:
    """The cells a resumed run would still do (not finished, or damaged, in ``out``) and the folder's scan, so that
    ``bench run`` can stop before it sets anything up when there is nothing left (no torch import, no run record)."""
    scan = results.scan_results(out)
    done = results.finished_cell_ids(out, scan)
    return [c for c in cells if c.cell_id not in done], scan


def run_cells(
    cells: Sequence[Cell],
    out: Path,
    runtime: Runtime,
    executor,
    run_info: dict,
    force: bool = False,
    console=None,
    scan: results.ResultsScan | None = None,
) -> dict[str, int]:
    """Resume-aware loop: skip finished cells (unless ``force``), write skipped cells directly, hand the rest to the
    executor and write each record the moment it arrives. Returns the status counts of the whole suite. ``scan``:
    the folder's ``results.scan_results`` when the caller already has it (``pending_cells``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    scan = scan or results.scan_results(out)
    suite_ids = {c.cell_id for c in cells}
    for cell_id, problem in scan.damaged.items():
        action = "re-running" if cell_id in suite_ids else "not a cell of this suite; left as it is"
        console.print(f"[yellow]damaged[/]: cell {cell_id}: {problem}, {action}", highlight=False)
    done = set() if force else results.finished_cell_ids(out, scan)
    pending = [c for c in cells if c.cell_id not in done]
    to_skip = [c for c in pending if c.skip_reason]
    to_run = order_for_sharing([c for c in pending if not c.skip_reason])
    by_id = {c.cell_id: c for c in to_run}
    if done:
        console.print(f"resuming: {len(cells) - len(pending)} of {len(cells)} cells already finished in {out}")

    def primary(cell: Cell, record=None) -> str:
        return primary_metric(runtime.registry, cell, record)

    runtime.results_dir, runtime.run_info = str(Path(out).absolute()), dict(run_info)  # jobs may run elsewhere
    # jobs of these executors write their cells' parts themselves (surviving a dead host): acknowledged, not rewritten
    jobs_write = executor.jobs_write_results
    for cell in to_skip:
        results.write_cell(out, cell, failed_record(cell, "skipped", cell.skip_reason), run_info, primary(cell))
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("cells", total=len(to_run))
        for record in executor.run(to_run, runtime):
            cell = by_id[record.cell_id]
            if not (jobs_write and results.is_written(out, record)):
                results.write_cell(out, cell, record, run_info, primary(cell, record))
            if record.status != "ok":
                progress.console.print(
                    f"[yellow]{record.status}[/]: {cell.label}: {record.reason.splitlines()[0] if record.reason else ''}"
                )
            progress.update(bar, advance=1, description=cell.label[:60])
    return summarize(out, cells)
