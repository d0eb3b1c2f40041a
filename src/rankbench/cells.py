"""Cells: one (task config, selector, factorization, budget, seed) combination, with stable ids and seeds.

Ids are content hashes of a canonical JSON form (sorted keys, parameters with their defaults filled in), so listing
order, YAML formatting or spelling a default out never changes them (benchopt #807).

* ``config_key``: the configuration alone (task, methods, parameters, budget, seed, device kind).
* ``cell_id``: ``config_key`` plus the versions of the plugins involved (declared version + hash of the plugin's
  file): editing a plugin gives its cells new ids, so a re-run recomputes them instead of serving stale results.
* ``task_key``: the task configuration and device: what expensive shared work (models, statistics) is keyed on.
* seeds: ``task_seed`` depends on the task configuration and the suite seed only, so every method sees the same
  problem instance; ``seed`` (the cell's own) also depends on the methods -- both independent of execution order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

REFERENCE_SELECTOR = "none"
REFERENCE_FACTORIZATION = "dense"


def _hash(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _seed(value: Any) -> int:
    return int(_hash(value, 8), 16) & 0x7FFFFFFF


def derived_seed(task_seed: int, *parts: Any) -> int:
    """A stable 63-bit seed for one use (``"init"``, ``"batches"``, ...) of a task seed, for a task's generators."""
    text = json.dumps([int(task_seed), *[str(p) for p in parts]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class Cell:
    suite: str
    task: str
    task_params: dict[str, Any]
    selector: str
    selector_params: dict[str, Any]
    factorization: str
    factorization_params: dict[str, Any]
    budget: float | None
    budget_kind: str | None
    seed: int  # the suite seed
    device: str
    versions: dict[str, str]  # "kind:name" -> plugin version
    timeout: float | None
    skip_reason: str | None = None
    problem_kind: str | None = None  # the protocol the cell runs through (rankbench.kinds.cell_kind); not in its id

    @property
    def is_reference(self) -> bool:
        return self.selector == REFERENCE_SELECTOR

    def config(self) -> dict[str, Any]:
        return {
            "task": [self.task, self.task_params],
            "selector": [self.selector, self.selector_params],
            "factorization": [self.factorization, self.factorization_params],
            "budget": None if self.budget is None else float(self.budget),
            "budget_kind": self.budget_kind,
            "seed": self.seed,
            "device": self.device.split(":")[0],
        }

    @functools.cached_property
    def config_key(self) -> str:
        return _hash(self.config())

    @functools.cached_property
    def cell_id(self) -> str:
        return _hash([self.config(), sorted(self.versions.items())])

    @functools.cached_property
    def task_key(self) -> str:
        return _hash([self.task, self.task_params, self.versions.get(f"task:{self.task}"), self.device])

    @property
    def task_seed(self) -> int:
        return _seed([self.task, self.task_params, self.seed])

    @property
    def cell_seed(self) -> int:
        return _seed(self.config())

    @property
    def label(self) -> str:
        budget = "" if self.budget is None else f" @{self.budget:g}"
        return f"{self.task} | {self.selector} + {self.factorization}{budget} | seed {self.seed}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Cell:
        return cls(**json.loads(text))


def make_cell(
    suite, task, selector, factorization, budget, budget_kind, seed, device, timeout, skip_reason=None,
    problem_kind=None,
) -> Cell:
    """Build a cell from resolved ``PluginSpec``s; selector and factorization None make the dense reference cell."""
    versions = {f"task:{task.name}": task.version}
    if selector is not None:
        versions[f"selector:{selector.name}"] = selector.version
        versions[f"factorization:{factorization.name}"] = factorization.version
    return Cell(
        suite=suite,
        task=task.name,
        task_params=task.params,
        selector=selector.name if selector else REFERENCE_SELECTOR,
        selector_params=selector.params if selector else {},
        factorization=factorization.name if factorization else REFERENCE_FACTORIZATION,
        factorization_params=factorization.params if factorization else {},
        budget=None if budget is None else float(budget),
        budget_kind=budget_kind,
        seed=int(seed),
        device=device,
        versions=versions,
        timeout=timeout,
        skip_reason=skip_reason,
        problem_kind=problem_kind,
    )
