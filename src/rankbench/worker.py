"""The worker process behind the ``subprocess`` executor: rebuilds the plugin registry, then runs cells sent over a
pipe, one at a time, keeping task set-ups warm between cells of the same configuration."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys

from rankbench.cells import Cell


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a killed ``bench run`` leaves no orphan worker running."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_main(conn, plugins_dir: str | None, device: str, timeout: float | None, threads: int | None = None) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from rankbench.runner import worker_runtime

    runtime = worker_runtime(plugins_dir, device, timeout, threads)
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
