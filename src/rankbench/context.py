"""``CellContext``: what the host hands a task for one cell, and how the task reports back."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rankbench.measure import PhaseTimer

T = TypeVar("T")


class CellContext:
    """The host's side of one cell.

    Attributes a task reads: ``seed`` (this cell's seed, for method randomness), ``task_seed`` (the same for every
    cell of one task configuration and suite seed: use it to generate data, so all methods see the same instance),
    ``device`` (``"cpu"`` or ``"cuda"``), ``budget`` and ``budget_kind``, ``shared`` (a dict that lives as long as the
    worker process, one per task configuration and device: memoise models and statistics there with ``memo``; it is shared by
    all suite seeds, so key seed-dependent data by ``task_seed``), ``cache_dir`` (a folder per task for on-disk
    caches that outlive the process).
    """

    def __init__(
        self,
        *,
        cell_id: str,
        seed: int,
        task_seed: int,
        device: str,
        budget: float | None,
        budget_kind: str | None,
        shared: dict[str, Any],
        cache_dir: Path,
    ):
        self.cell_id = cell_id
        self.seed = seed
        self.task_seed = task_seed
        self.device = device
        self.budget = budget
        self.budget_kind = budget_kind
        self.shared = shared
        self.cache_dir = cache_dir
        self.timer = PhaseTimer(device)
        self.metrics: list[dict[str, Any]] = []
        self.ranks_rows: list[dict[str, Any]] = []
        self.curve_rows: list[dict[str, Any]] = []
        self.notes: dict[str, str] = {}

    def memo(self, key: Hashable, factory: Callable[[], T], *, slot: str | None = None) -> T:
        """``factory()``, computed once per ``key`` for as long as ``shared`` lives (one task configuration and device
        in one process). With ``slot`` only the newest key of that slot is kept: a new key drops the old entry first
        (one model or one set of calibration statistics at a time, instead of one per suite seed)."""
        if slot is None:
            if key not in self.shared:
                self.shared[key] = factory()
            return self.shared[key]
        held = self.shared.get(slot)
        if held is None or held[0] != key:
            self.shared.pop(slot, None)  # free the old entry before building the new one
            held = self.shared[slot] = (key, factory())
        return held[1]

    def record_size(self, kept: int, dense: int) -> None:
        """The ``params`` (parameters the cell's sites store) and ``param_ratio`` (over their dense parameters)
        metrics every finished cell records."""
        self.metric("params", kept, "", None)
        self.metric("param_ratio", kept / dense, "", None)

    def phase(self, name: str):
        """Context manager timing one phase (``time_<name>_s``); device-synchronised on CUDA."""
        return self.timer.phase(name)

    def metric(self, name: str, value: float, unit: str = "", higher_is_better: bool | None = None) -> None:
        self.metrics.append({"metric": name, "value": float(value), "unit": unit, "higher_is_better": higher_is_better})

    def ranks(self, site: str, rank: int | Sequence[int], params: int) -> None:
        """Record the rank a site ended with (a tensor site's per-mode ranks are joined as ``r1x r2x ...``)."""
        if isinstance(rank, (int, np.integer)):
            rank_value, rank_text = int(rank), str(int(rank))
        else:
            rank_value, rank_text = int(max(rank)), "x".join(str(int(r)) for r in rank)
        self.ranks_rows.append({"site": site, "rank": rank_value, "rank_per_mode": rank_text, "params": int(params)})

    def curve(self, name: str, values: Sequence[float], steps: Sequence[float] | None = None) -> None:
        """Store a curve (e.g. relative error against iteration) so the report can draw it."""
        steps = range(len(values)) if steps is None else steps
        for step, value in zip(steps, values):
            self.curve_rows.append({"curve": name, "step": float(step), "value": float(value)})

    def note(self, key: str, text: str) -> None:
        """Record a fact that is text, not a number (a checksum, a fallback a method took); ``cells.notes``."""
        self.notes[str(key)] = str(text)

    def quality_is_finite(self) -> bool:
        return all(math.isfinite(m["value"]) for m in self.metrics)
