"""rankbench: a plugin-based benchmarking harness for low-rank methods."""

from rankbench.api import (
    ADAPTATION,
    COMPRESSION,
    PARAM_RATIO,
    RANK_CAP,
    RANK_TOTAL,
    RECOVERY,
    TRAINING,
    CellFailure,
    Diverged,
    Executor,
    Factorization,
    PluginParams,
    RankProblem,
    Selector,
    SelfRunningTask,
    Site,
    SkipCell,
    Task,
)
from rankbench.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ADAPTATION",
    "COMPRESSION",
    "PARAM_RATIO",
    "RANK_CAP",
    "RANK_TOTAL",
    "RECOVERY",
    "TRAINING",
    "CellFailure",
    "Diverged",
    "Executor",
    "Factorization",
    "PluginParams",
    "RankProblem",
    "Selector",
    "SelfRunningTask",
    "Site",
    "SkipCell",
    "Task",
    "hookimpl",
]
