"""Leaderboards, pairwise calls and rankings of a results folder: pure data (DataFrames and ``stats.Ranking``s), no
plotting. ``bench report`` renders them as Markdown and text; an HTML report can render the same frames.

All statistics come from ``rankbench.stats`` (intervals over seeds, paired win/tie/loss calls, Friedman/Nemenyi
rankings), so "A beats B" means the same thing everywhere. Every function works on the *primary metric* of each
task configuration (``cells.primary_metric``) over the seeds whose cell finished ``ok`` with a finite value; a
primary metric recorded without a direction counts as lower-is-better (errors, perplexities).

* ``load(out)``: the latest cell of every configuration, labelled, and their metrics.
* ``leaderboard(cells, metrics)``: one row per (task configuration, method, budget): the median over seeds with its
  bootstrap interval, the rank within the task configuration, and the paired call against the dense reference.
* ``pairwise(cells, metrics)``: every ordered pair of methods at the same task configuration and budget, paired
  over their common seeds.
* ``score_tables(board, by)`` and ``rankings(board, by)`` (``board``: the leaderboard frame): methods ranked across configurations,
  per family (``by``, default the task name) and ``"overall"``; see ``score_tables`` for the rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from rankbench import results, stats
from rankbench.cells import REFERENCE_FACTORIZATION, REFERENCE_SELECTOR

OVERALL = "overall"
GROUP = ["task_config", "method", "budget", "budget_kind"]
LEADERBOARD_COLUMNS = ["task_config", "task", "method", "selector", "factorization", "budget", "budget_kind",
                       "metric", "higher_is_better", "n", "estimate", "low", "high", "text", "param_ratio",
                       "is_reference", "rank", "vs_reference", "verdict_vs_reference"]  # fmt: skip
PAIRWISE_COLUMNS = ["task_config", "budget", "budget_kind", "a", "b", "difference", "low", "high", "n", "verdict"]
NO_REFERENCE = "no dense reference"


def load(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``cells`` of a results folder, only the latest cell of each configuration (``results.latest_cells``),
    with two label columns added: ``task_config`` (``results.configuration_labels``: the task name plus the
    parameters that tell the folder's configurations of that task apart) and ``method`` (``"selector +
    factorization"``); and the ``metrics`` rows of those cells, with ``task_config``, ``method`` and
    ``primary_metric`` joined on."""
    cells = results.read_table(out, "cells")
    if cells.empty:
        return cells, results.read_table(out, "metrics")
    cells = results.latest_cells(cells)
    cells["task_config"] = results.configuration_labels(cells["task"], cells["task_params"])
    cells["method"] = cells["selector"] + " + " + cells["factorization"]
    metrics = results.read_table(out, "metrics")
    metrics = metrics[metrics["cell_id"].isin(cells["cell_id"])]
    metrics = metrics.merge(cells[["cell_id", "task_config", "method", "primary_metric"]], on="cell_id")
    return cells, metrics


# --------------------------------------------------------------------------------------------------- per seed


def _labelled(cells: pd.DataFrame) -> pd.DataFrame:
    if "task_config" not in cells.columns:
        cells = cells.assign(task_config=results.configuration_labels(cells["task"], cells["task_params"]))
    if "method" not in cells.columns:
        cells = cells.assign(method=cells["selector"] + " + " + cells["factorization"])
    return cells


def _direction(values) -> bool:
    """The more common of the directions given (higher_is_better True/False); a tie or none: False."""
    counts = Counter(bool(v) for v in values if v is not None and not pd.isna(v))
    return counts[True] > counts[False]


def _per_seed(cells: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per ok cell with a finite primary metric: the cell's labels, seed, ``value`` (the primary metric),
    ``param_ratio`` (NaN where not recorded) and ``higher_is_better`` (the task configuration's direction)."""
    columns = [*GROUP, "task", "selector", "factorization", "seed", "metric", "value", "param_ratio",
               "higher_is_better"]  # fmt: skip
    if cells.empty or metrics.empty:
        return pd.DataFrame(columns=columns)
    cells = _labelled(cells)
    ok = cells[cells["status"] == "ok"][["cell_id", *GROUP, "task", "selector", "factorization", "seed",
                                         "primary_metric"]]  # fmt: skip
    values = metrics[["cell_id", "metric", "value", "higher_is_better"]].merge(ok, on="cell_id")
    primary = values[(values["metric"] == values["primary_metric"]) & np.isfinite(values["value"].astype(float))]
    ratio = values[values["metric"] == "param_ratio"][["cell_id", "value"]].rename(columns={"value": "param_ratio"})
    primary = primary.merge(ratio.drop_duplicates("cell_id"), on="cell_id", how="left")
    directions = primary.groupby("task_config")["higher_is_better"].agg(_direction)
    primary = primary.assign(higher_is_better=primary["task_config"].map(directions).astype(bool))
    return primary[columns].reset_index(drop=True)


def _by_seed(group: pd.DataFrame) -> dict[int, float]:
    """{seed: value}; a seed recorded twice (two suites) counts once, as the median of its values."""
    return {int(seed): float(v) for seed, v in group.groupby("seed")["value"].median().items()}


def _groups(data: pd.DataFrame, keys: list[str]):
    return data.groupby(keys, dropna=False, sort=True)


# --------------------------------------------------------------------------------------------------- leaderboard


def _is_reference(selector: str, factorization: str) -> bool:
    return selector == REFERENCE_SELECTOR and factorization == REFERENCE_FACTORIZATION


def leaderboard(cells: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (task configuration, method, budget) that has at least one ok seed, sorted by ``task_config``
    then ``rank``. Columns:

    * ``task_config, task, method, selector, factorization, budget, budget_kind``: what was run (``budget`` NaN for
      the dense reference and budget-free methods);
    * ``metric``: the primary metric; ``higher_is_better``: its direction in this task configuration;
    * ``n``: the seeds that finished ok with a finite primary metric;
    * ``estimate, low, high``: ``stats.seed_interval`` over those seeds (median, 95 % percentile-bootstrap interval
      of the median; ``low``/``high`` NaN when ``n < 3``); ``text``: ``Interval.text()``, e.g.
      ``0.0123 [0.0119, 0.0131] (n=5)`` or ``0.0123 (n=2: n too small)``;
    * ``param_ratio``: the median over seeds of the parameter ratio the method ended with (NaN if not recorded);
    * ``is_reference``: the dense reference (``none + dense``);
    * ``rank``: 1 = best estimate within the task configuration, over all its rows (every method and budget, the
      reference included; equal estimates share the better rank);
    * ``vs_reference``: ``stats.paired_comparison`` of this row against the dense reference of the same task
      configuration, paired by seed (positive difference = this method is better), as ``Paired.text()``;
      ``verdict_vs_reference``: its ``win`` / ``tie`` / ``loss`` / ``n too small``. Both are ``""`` on the
      reference itself; where the task configuration has no reference, ``vs_reference`` says so and the verdict is
      ``""``.
    """
    data = _per_seed(cells, metrics)
    if data.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    references = {}
    for config, sub in data.groupby("task_config"):
        ref = sub[[_is_reference(s, f) for s, f in zip(sub["selector"], sub["factorization"])]]
        if len(ref):  # one reference per task configuration; should there be several, the one with most seeds
            groups = [g for _, g in _groups(ref, ["budget", "budget_kind"])]
            references[config] = _by_seed(max(groups, key=lambda g: g["seed"].nunique()))
    rows = []
    for (config, method, budget, budget_kind), group in _groups(data, GROUP):
        first = group.iloc[0]
        hib = bool(first["higher_is_better"])
        by_seed = _by_seed(group)
        interval = stats.seed_interval(list(by_seed.values()))
        reference = _is_reference(first["selector"], first["factorization"])
        if reference:
            vs, verdict = "", ""
        elif config in references:
            paired = stats.paired_comparison(by_seed, references[config], hib)
            vs, verdict = paired.text(), paired.verdict
        else:
            vs, verdict = NO_REFERENCE, ""
        rows.append({
            "task_config": config, "task": first["task"], "method": method, "selector": first["selector"],
            "factorization": first["factorization"], "budget": budget, "budget_kind": budget_kind,
            "metric": first["metric"], "higher_is_better": hib, "n": interval.n, "estimate": interval.estimate,
            "low": math.nan if interval.low is None else interval.low,
            "high": math.nan if interval.high is None else interval.high,
            "text": interval.text(), "param_ratio": group.groupby("seed")["param_ratio"].median().median(),
            "is_reference": reference, "vs_reference": vs, "verdict_vs_reference": verdict,
        })  # fmt: skip
    board = pd.DataFrame(rows)
    board["rank"] = 0
    for _, sub in board.groupby("task_config"):
        hib = bool(sub["higher_is_better"].iloc[0])
        board.loc[sub.index, "rank"] = sub["estimate"].rank(method="min", ascending=not hib).astype(int)
    board["rank"] = board["rank"].astype(int)
    board = board.sort_values(["task_config", "rank", "method", "budget"], na_position="first")
    return board[LEADERBOARD_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- pairwise


def pairwise(cells: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Every ordered pair of methods (``a``, ``b``, ``a != b``) run at the same task configuration and budget:
    ``stats.paired_comparison`` of A against B over their common seeds. ``difference`` is the mean over those seeds of
    A - B oriented so that positive means A is better, ``low``/``high`` its 95 % bootstrap interval (NaN with fewer
    than 3 common seeds), ``n`` the common seeds, ``verdict`` ``win`` (A better), ``tie``, ``loss`` or ``n too
    small``. (B, A) is the mirror of (A, B): negated difference and interval, win and loss swapped. The dense
    reference (budget NaN) pairs with the budget-free methods of its task configuration. Columns: ``task_config,
    budget, budget_kind, a, b, difference, low, high, n, verdict``; sorted by task configuration, budget, a, b."""
    data = _per_seed(cells, metrics)
    rows = []
    mirror = {stats.WIN: stats.LOSS, stats.LOSS: stats.WIN}
    for (config, budget, budget_kind), group in _groups(data, ["task_config", "budget", "budget_kind"]):
        hib = bool(group["higher_is_better"].iloc[0])
        by_method = {method: _by_seed(sub) for method, sub in group.groupby("method", sort=True)}
        methods = list(by_method)
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                p = stats.paired_comparison(by_method[a], by_method[b], hib)
                low = math.nan if p.low is None else p.low
                high = math.nan if p.high is None else p.high
                base = {"task_config": config, "budget": budget, "budget_kind": budget_kind, "n": p.n}
                rows.append({**base, "a": a, "b": b, "difference": p.difference, "low": low, "high": high,
                             "verdict": p.verdict})  # fmt: skip
                rows.append({**base, "a": b, "b": a, "difference": -p.difference, "low": -high, "high": -low,
                             "verdict": mirror.get(p.verdict, p.verdict)})  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=PAIRWISE_COLUMNS)
    table = pd.DataFrame(rows)[PAIRWISE_COLUMNS]
    return table.sort_values(["task_config", "budget", "a", "b"], na_position="first").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- rankings


@dataclasses.dataclass
class ScoreTable:
    """What one ranking is computed on. ``scores``: one row per configuration, indexed by (``task_config``,
    ``budget``), one column per method, no missing values; ``higher_is_better``: the direction of ``scores``;
    ``families``: the families whose rows it holds; ``dropped_methods``: methods of those families left out because
    they do not cover the most rows; ``dropped_rows``: configurations left out because a kept method is missing
    there or their primary metric has the other direction."""

    scores: pd.DataFrame
    higher_is_better: bool
    families: list[str]
    dropped_methods: list[str]
    dropped_rows: int


def _score_table(board: pd.DataFrame, families: list[str], direction: bool | None = None) -> ScoreTable | None:
    """The score table of ``board``'s rows (see ``score_tables``); with ``direction`` given (``"overall"``), only
    the rows of that direction, as per-row ranks."""
    per_row_ranks = direction is not None
    rows = board.drop_duplicates(["task_config", "budget"])
    hib = direction if per_row_ranks else _direction(rows["higher_is_better"])
    same = board[board["higher_is_better"] == hib]
    all_rows = len(rows)
    methods = sorted(board["method"].unique())
    table = _groups(same, ["task_config", "budget", "method"])["estimate"].median().unstack("method")
    if table.empty:
        return None
    coverage = table.notna().sum(axis=0)
    kept = sorted(coverage[coverage == coverage.max()].index)
    table = table[kept].dropna(axis=0, how="any")
    if table.shape[1] < 2 or table.empty:
        return None
    table.columns.name = None
    if per_row_ranks:  # 1 = best in its row, whatever the metric's scale
        table = table.rank(axis=1, ascending=not hib, method="average")
        hib = False
    return ScoreTable(table, hib, families, [m for m in methods if m not in kept], all_rows - len(table))


def score_tables(board: pd.DataFrame, by: str = "task") -> dict[str, ScoreTable]:
    """The score tables ``rankings`` ranks: per family (the values of the leaderboard column ``by``; default the
    task name) and ``"overall"``.

    A row is a configuration (``task_config``, ``budget``), a column a method (the dense reference is never ranked),
    a value the method's median primary metric over its seeds (the leaderboard's ``estimate``). Methods rarely run
    on every configuration, and the tests need complete rows, so the rule is: keep the methods that cover the most
    rows (all methods tied at the highest row count), then drop the rows missing any of them (the methods left out
    are in ``dropped_methods``). A family whose configurations disagree on the primary metric's direction keeps
    the rows of the more common direction (a tie: lower is better).

    ``"overall"`` combines only families whose primary metrics share a direction: those with the direction most
    families have (a tie: lower is better); the others keep their own entry only. Its values are the per-row ranks
    (1 = best in that configuration, ``higher_is_better`` False): metrics of different families live on different
    scales, ranks do not, and the Friedman test only uses within-row ranks anyway. The same coverage rule applies
    over the combined rows.

    A family or ``"overall"`` with fewer than 2 methods or no complete row has no entry. ``board`` is the
    ``leaderboard`` frame (computed once: its intervals are bootstraps)."""
    board = board[~board["is_reference"]]
    if board.empty:
        return {}
    tables: dict[str, ScoreTable] = {}
    directions = {}
    for family, sub in board.groupby(by, sort=True):
        table = _score_table(sub, [str(family)])
        if table is not None:
            tables[str(family)] = table
            directions[str(family)] = table.higher_is_better
    if directions:
        overall_hib = _direction(pd.Series(list(directions.values())))
        families = sorted(f for f, d in directions.items() if d == overall_hib)
        table = _score_table(board[board[by].astype(str).isin(families)], families, overall_hib)
        if table is not None:
            tables[OVERALL] = table
    return tables


def rankings(board: pd.DataFrame, by: str = "task") -> dict[str, stats.Ranking]:
    """``stats.rank_methods`` on each of ``score_tables(board, by)`` (``board``: the ``leaderboard`` frame): per family (default: per task name)
    and ``"overall"``, the methods' average ranks across configurations (1 = best), Friedman's p-value and
    Nemenyi's critical difference (None with fewer than 3 methods or 5 configurations). See ``score_tables`` for
    which methods and configurations each ranking covers and how ``"overall"`` combines families."""
    return {name: stats.rank_methods(table.scores, table.higher_is_better)
            for name, table in score_tables(board, by).items()}  # fmt: skip


@dataclasses.dataclass
class Summary:
    """Everything the reports show of one results folder, computed once (the leaderboard's intervals and the
    pairwise calls are bootstraps): the cells and metrics, the leaderboard, the pairwise calls, the score tables
    and their rankings."""

    cells: pd.DataFrame
    metrics: pd.DataFrame
    board: pd.DataFrame
    pairs: pd.DataFrame
    tables: dict[str, ScoreTable]
    rankings: dict[str, stats.Ranking]


def summarise(out: Path) -> Summary:
    """Load ``out`` and compute its leaderboard, pairwise calls and rankings (empty frames for an empty folder)."""
    cells, metrics = load(out)
    if cells.empty or metrics.empty:
        empty = pd.DataFrame(columns=LEADERBOARD_COLUMNS)
        return Summary(cells, metrics, empty, pd.DataFrame(columns=PAIRWISE_COLUMNS), {}, {})
    board = leaderboard(cells, metrics)
    tables = score_tables(board)
    ranked = {name: stats.rank_methods(table.scores, table.higher_is_better) for name, table in tables.items()}
    return Summary(cells, metrics, board, pairwise(cells, metrics), tables, ranked)
