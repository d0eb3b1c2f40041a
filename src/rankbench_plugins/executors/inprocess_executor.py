"""Executor ``inprocess``: runs every cell in the ``bench`` process itself.

Fastest (no worker start-up, shared set-ups stay warm), but a plugin that segfaults or calls ``os._exit`` takes the
run down with it, and the per-cell limit is a SIGALRM alarm: it interrupts Python code at its limit, but a long call
inside a C extension only returns to Python -- and times out -- when that call ends. Use ``subprocess`` (the default)
where isolation and hard limits matter.
"""

from __future__ import annotations

from rankbench import Executor, hookimpl


class InProcessExecutor(Executor):
    name = "inprocess"
    description = "run cells in the bench process (no isolation; SIGALRM time limit)"
    in_process = True

    def run(self, cells, runtime):
        for cell in cells:
            yield runtime.execute(cell, alarm=True)


@hookimpl
def rankbench_register_executors(register):
    register(InProcessExecutor)
