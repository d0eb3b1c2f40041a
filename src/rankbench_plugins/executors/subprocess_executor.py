"""Executor ``subprocess`` (the default): cells run in a worker process with a hard per-cell time limit.

This module is both sides: the executor (``SubprocessExecutor``, in the ``bench`` process) and the worker loop
(``worker_main``, which ``multiprocessing`` starts with ``spawn`` in a fresh interpreter that imports this module).
The worker rebuilds the plugin registry (``rankbench.runner.worker_runtime``), then runs the cells sent over a pipe.
One worker runs the cells of one task configuration one after another, so its set-up (a loaded model, its
statistics) is shared by them; the next configuration gets a fresh worker, so a cell's ``peak_rss_mb`` never
includes what an earlier configuration left in the process. The parent waits for each result at most the cell's
timeout; at the limit it kills the worker (SIGKILL: nothing cooperative about it) and records ``timeout``. A worker
that dies -- segfault, ``os._exit``, the OOM killer -- gives ``crashed`` with the signal or exit code. Either way a
fresh worker takes the next cell and the suite goes on. The worker leads its own session and process group, and it
is the group that is killed -- with whatever a method started in it (a data loader, a solver binary); the record's
reason says how many processes were ended. (A descendant that starts a session of its own escapes the group.)
``fresh_worker: true`` starts a new worker for every cell (cleanest memory numbers, slower).
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import time

from pydantic import Field

from rankbench import Executor, PluginParams, hookimpl
from rankbench.api import CellRecord
from rankbench.cells import Cell

# ---------------------------------------------------------------------------------------------------------------------
# The worker (runs in the child process)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a killed ``bench run`` leaves no orphan worker running."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_main(conn, plugins_dir: str | None, device: str, timeout: float | None, threads: int | None = None,
                deterministic: bool = False) -> None:
    """The worker's loop: rebuild the registry (``deterministic``: ``bench run --deterministic``, applied first), say
    ready, then run each cell received (JSON) and send its record back, until the parent sends None or the pipe
    closes."""
    from rankbench.runner import worker_runtime

    _die_with_parent()
    os.setsid()  # its own process group: a kill at the limit ends whatever the cell started too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    runtime = worker_runtime(plugins_dir, device, timeout, threads, deterministic)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        record = runtime.execute(Cell.from_json(message))
        try:
            conn.send(("record", dataclasses.asdict(record)))
        except (BrokenPipeError, OSError):
            return


# ---------------------------------------------------------------------------------------------------------------------
# The executor (runs in the bench process)


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker stopped answering"
    if exitcode < 0:
        try:
            return f"the worker was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"the worker was killed by signal {-exitcode}"
    return f"the worker exited with code {exitcode}"


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux /proc; elsewhere: the leader, if alive)."""
    if not os.path.isdir("/proc/self"):
        return [pgid]
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


def _kill_group(pgid: int) -> int:
    """SIGKILL every process of group ``pgid``; returns how many were alive."""
    alive = _group_members(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return len(alive)


def _ended(count: int) -> str:
    return f" ({count} process{'es' if count != 1 else ''} ended)" if count else ""


class _Worker:
    def __init__(self, runtime, start_timeout: float):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main,
            args=(child, runtime.plugins_dir, runtime.device, runtime.timeout, runtime.threads,
                  runtime.deterministic),
            daemon=True,
            name="rankbench-worker",
        )
        self.process.start()
        child.close()
        if not self.conn.poll(start_timeout):
            self.kill()
            raise RuntimeError(f"the worker did not start within {start_timeout:g} s")
        try:
            self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the worker failed to start: {_exit_description(self.process.exitcode)}") from None

    def kill(self) -> int:
        """Kill the worker's process group (the worker and what its cells started); returns how many processes
        were ended."""
        ended = _kill_group(self.process.pid) if self.process.pid else 0
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
        return ended

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(10)
        except (BrokenPipeError, OSError):
            pass
        self.kill()


class SubprocessExecutor(Executor):
    name = "subprocess"
    description = "run cells in a worker process; hard kill at the per-cell limit; crashes are contained"
    default = True

    class Params(PluginParams):
        fresh_worker: bool = False
        start_timeout: float = Field(default=600.0, gt=0)

    def run(self, cells, runtime):
        from rankbench.runner import failed_record

        worker, task_key = None, None
        try:
            for cell in cells:
                if worker is not None and cell.task_key != task_key:
                    worker.stop()  # a new task configuration: nothing to share, and a clean process for its memory
                    worker = None
                task_key = cell.task_key
                if worker is None:
                    try:
                        worker = _Worker(runtime, self.params.start_timeout)
                    except RuntimeError as exc:
                        yield failed_record(cell, "crashed", str(exc))
                        continue
                record, healthy = self._run_one(worker, cell)
                yield record
                if not healthy:
                    worker.kill()
                    worker = None
                elif self.params.fresh_worker:
                    worker.stop()
                    worker = None
        finally:
            if worker is not None:
                worker.stop()

    @staticmethod
    def _run_one(worker: _Worker, cell) -> tuple[CellRecord, bool]:
        from rankbench.runner import failed_record, now

        started_at, start = now(), time.perf_counter()
        try:
            worker.conn.send(cell.to_json())
        except (BrokenPipeError, OSError):
            return failed_record(cell, "crashed", _exit_description(worker.process.exitcode), 0.0, started_at), False
        if not worker.conn.poll(cell.timeout):  # None: wait forever
            ended = worker.kill()
            wall = time.perf_counter() - start
            return failed_record(
                cell, "timeout", f"killed at the per-cell limit of {cell.timeout:g} s{_ended(ended)}", wall,
                started_at
            ), False
        try:
            _, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(5)
            wall = time.perf_counter() - start
            left = _kill_group(worker.process.pid)  # what the dead worker's cell had started
            return failed_record(cell, "crashed", _exit_description(worker.process.exitcode) + _ended(left), wall,
                                 started_at), False
        return CellRecord(**payload), True


@hookimpl
def rankbench_register_executors(register):
    register(SubprocessExecutor)
