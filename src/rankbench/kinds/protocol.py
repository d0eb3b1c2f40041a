"""``Protocol``: how the cells of one problem kind run. Each kind module declares its own ``PROTOCOL``;
``rankbench.kinds.PROTOCOLS`` is the table the host dispatches through."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rankbench.api import Factorization, Selector, Task


WORK_COUNTERS = "counters"  # ctx.memo slot: counts of the expensive work done in this process (per kind docstrings)


def count_work(ctx, name: str, amount: int = 1) -> None:
    """Count ``amount`` pieces of expensive work (calibration passes, decompositions) in the process's memo."""
    counters = ctx.memo(WORK_COUNTERS, dict)
    counters[name] = counters.get(name, 0) + amount


def no_setup(task: Task, ctx) -> None:
    """A kind with no shared work of its own before a cell (the task's ``setup`` still runs)."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """``kind`` and the task ``capability`` base it needs; ``skip`` (why a pairing cannot run, decided when the suite is
    expanded), ``setup`` (the kind's shared work before every cell, timed as phase ``setup``), ``reference`` (the
    dense reference cell) and ``run`` (a method's cell)."""

    kind: str
    capability: type[Task]
    run: Callable[..., None]
    reference: Callable[..., None]
    skip: Callable[[Task, Selector, Factorization], str | None]
    setup: Callable[[Task, object], None] = no_setup
