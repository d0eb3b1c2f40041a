"""rankbench.leaderboard on planted results folders (part files written with the project's own writer, as `bench run`
writes them): a constant improvement on every seed wins with an interval excluding 0, identical methods tie, two
seeds give no interval, planted orderings across configurations give the right average ranks."""

import math

import numpy as np
import pytest

from rankbench import leaderboard, stats
from rankbench.api import CellRecord
from rankbench.cells import REFERENCE_FACTORIZATION, REFERENCE_SELECTOR, Cell
from rankbench.results import write_cell

REFERENCE = f"{REFERENCE_SELECTOR} + {REFERENCE_FACTORIZATION}"


def plant(out, method: str, values: dict[int, float], *, task="toy", task_params=None, budget=0.5,
          metric="rel_error", higher_is_better=False, param_ratio=0.5, status="ok", extra=()):
    """Write one cell per seed of ``method`` ("selector + factorization"; the dense reference has no budget) with the
    primary metric ``metric`` = ``values[seed]``."""
    selector, factorization = method.split(" + ")
    reference = method == REFERENCE
    for seed, value in values.items():
        cell = Cell(suite="planted", task=task, task_params=task_params or {"size": 12}, selector=selector,
                    selector_params={}, factorization=factorization, factorization_params={},
                    budget=None if reference else budget, budget_kind=None if reference else "param_ratio",
                    seed=seed, device="cpu", versions={}, timeout=None)  # fmt: skip
        metrics = [{"metric": metric, "value": value, "higher_is_better": higher_is_better},
                   {"metric": "param_ratio", "value": 1.0 if reference else param_ratio},
                   {"metric": "time_total_s", "value": 0.01, "unit": "s", "higher_is_better": False}, *extra]
        record = CellRecord(cell_id=cell.cell_id, status=status, metrics=metrics if status == "ok" else [],
                            started_at=f"2025-01-01T00:00:{seed:02d}", primary_metric=metric)  # fmt: skip
        write_cell(out, cell, record, {"git_sha": "x", "device": "cpu"}, metric)


SEEDS = range(5)
BASE = dict(zip(SEEDS, np.random.default_rng(0).normal(0.5, 0.1, 5).tolist()))  # wide seed-to-seed spread


def _row(table, **where):
    mask = np.ones(len(table), dtype=bool)
    for column, value in where.items():
        mask &= (table[column] == value).to_numpy()
    assert mask.sum() == 1, (where, table)
    return table[mask].iloc[0]


@pytest.fixture
def planted(tmp_path):
    out = tmp_path / "out"
    # lower is better (rel_error): energy better than uniform by 0.01 on every seed; twin identical to uniform
    plant(out, REFERENCE, {s: 0.0 for s in SEEDS})
    plant(out, "uniform + svd", BASE)
    plant(out, "energy + svd", {s: v - 0.01 for s, v in BASE.items()})
    plant(out, "twin + svd", dict(BASE))
    plant(out, "few + svd", {0: 0.8, 1: 0.9})  # two seeds only
    # higher is better (accuracy): a method that beats the dense reference by 0.02 on every seed, one that equals it
    acc = {"task": "cls", "metric": "accuracy", "higher_is_better": True}
    plant(out, REFERENCE, BASE, **acc)
    plant(out, "lora + svd", {s: v + 0.02 for s, v in BASE.items()}, **acc)
    plant(out, "same + svd", dict(BASE), **acc)
    return out


def test_leaderboard_intervals_ranks_and_calls_against_the_reference(planted):
    cells, metrics = leaderboard.load(planted)
    board = leaderboard.leaderboard(cells, metrics)
    assert list(board.columns) == leaderboard.LEADERBOARD_COLUMNS
    toy = board[board["task_config"] == "toy"]
    # lower is better: the reference (0) first, then energy, then uniform and its twin sharing rank 3, then few
    assert list(toy["method"]) == [REFERENCE, "energy + svd", "twin + svd", "uniform + svd", "few + svd"]
    assert list(toy["rank"]) == [1, 2, 3, 3, 5]
    energy = _row(toy, method="energy + svd")
    assert energy["n"] == 5 and energy["metric"] == "rel_error" and not energy["higher_is_better"]
    expected = stats.seed_interval([v - 0.01 for v in BASE.values()])
    assert energy["estimate"] == expected.estimate and energy["low"] == expected.low
    assert energy["low"] <= energy["estimate"] <= energy["high"] and energy["text"] == expected.text()
    assert energy["text"].endswith("(n=5)") and energy["param_ratio"] == 0.5
    # every method is worse than a dense reference with zero error, on every seed
    assert energy["verdict_vs_reference"] == "loss" and energy["vs_reference"].startswith("loss ")
    ref = _row(toy, method=REFERENCE)
    assert ref["is_reference"] and ref["vs_reference"] == ref["verdict_vs_reference"] == "" and math.isnan(ref["budget"])
    # two seeds: no interval, no call
    few = _row(toy, method="few + svd")
    assert few["n"] == 2 and "n too small" in few["text"] and math.isnan(few["low"]) and math.isnan(few["high"])
    assert few["verdict_vs_reference"] == stats.TOO_FEW
    # higher is better: a constant +0.02 on every seed beats the reference with an interval excluding 0
    cls = board[board["task_config"] == "cls"]
    lora = _row(cls, method="lora + svd")
    assert lora["rank"] == 1 and lora["higher_is_better"] and lora["verdict_vs_reference"] == "win"
    low, high = (float(x) for x in lora["vs_reference"].split("[")[1].split("]")[0].split(","))
    assert 0 < low <= 0.02 <= high
    assert _row(cls, method="same + svd")["verdict_vs_reference"] == "tie"


def test_pairwise_calls(planted):
    cells, metrics = leaderboard.load(planted)
    pairs = leaderboard.pairwise(cells, metrics)
    assert list(pairs.columns) == leaderboard.PAIRWISE_COLUMNS
    win = _row(pairs, task_config="toy", a="energy + svd", b="uniform + svd")
    assert win["verdict"] == "win" and win["low"] > 0 and win["difference"] == pytest.approx(0.01) and win["n"] == 5
    loss = _row(pairs, task_config="toy", a="uniform + svd", b="energy + svd")  # the mirror
    assert loss["verdict"] == "loss" and loss["high"] == -win["low"] and loss["difference"] == -win["difference"]
    tie = _row(pairs, task_config="toy", a="uniform + svd", b="twin + svd")
    assert tie["verdict"] == "tie" and tie["difference"] == 0 and tie["low"] <= 0 <= tie["high"]
    few = _row(pairs, task_config="toy", a="few + svd", b="uniform + svd")
    assert few["verdict"] == stats.TOO_FEW and few["n"] == 2 and math.isnan(few["low"])
    # the reference has no budget: it pairs only with methods without one
    assert REFERENCE not in set(pairs["a"]) | set(pairs["b"])
    assert len(pairs) == 2 * 6 + 2  # toy: 4 methods -> 12 ordered pairs; cls: 2 methods -> 2


def test_rankings_of_planted_orderings_across_six_configurations(tmp_path):
    """Lower is better. On six configurations (3 task configurations x 2 budgets) a < b < c < d in error, except on
    two configurations where b beats a: average ranks a 4/3, b 5/3, c 3, d 4. ``partial`` runs on half the
    configurations only and is left out of the ranking rather than dropping rows."""
    out = tmp_path / "out"
    level = {"a + svd": 1.0, "b + svd": 2.0, "c + svd": 3.0, "d + svd": 4.0}
    configs = [(size, budget) for size in (10, 20, 30) for budget in (0.3, 0.6)]
    for i, (size, budget) in enumerate(configs):
        scale = 10.0 ** i  # very different scales per configuration: ranks do not care
        for method, value in level.items():
            if i < 2 and method in ("a + svd", "b + svd"):
                value = 3.0 - value  # b beats a here
            plant(out, method, {0: value * scale}, task_params={"size": size}, budget=budget)
        if i % 2:
            plant(out, "partial + svd", {0: 0.0}, task_params={"size": size}, budget=budget)
    # a second family, higher-is-better, on another scale: never mixed into "overall" (it has the other direction
    # and fewer families than the lower-is-better ones)... unless the directions agree, see below
    for size in (1, 2, 3):
        for method, value in level.items():
            plant(out, method, {0: 100 - value}, task="cls", task_params={"size": size}, metric="accuracy",
                  higher_is_better=True)  # fmt: skip
    cells, metrics = leaderboard.load(out)
    ranked = leaderboard.rankings(leaderboard.leaderboard(cells, metrics))
    assert set(ranked) == {"toy", "cls", "overall"}
    toy = ranked["toy"]
    assert toy.n == 6
    assert toy.average_ranks.to_dict() == pytest.approx({"a + svd": 4 / 3, "b + svd": 5 / 3, "c + svd": 3.0,
                                                          "d + svd": 4.0})  # fmt: skip
    assert list(toy.average_ranks.index) == ["a + svd", "b + svd", "c + svd", "d + svd"]
    assert toy.friedman_p < 0.05 and toy.critical_difference > 0
    tables = leaderboard.score_tables(leaderboard.leaderboard(cells, metrics))
    assert tables["toy"].dropped_methods == ["partial + svd"] and tables["toy"].dropped_rows == 0
    assert list(tables["toy"].scores.index.names) == ["task_config", "budget"]
    assert REFERENCE not in tables["toy"].scores.columns
    cls = ranked["cls"]
    assert cls.average_ranks.to_dict() == {"a + svd": 1.0, "b + svd": 2.0, "c + svd": 3.0, "d + svd": 4.0}
    # two families with two directions: a tie, lower is better wins; overall holds toy only, as per-row ranks
    assert tables["overall"].families == ["toy"] and not tables["overall"].higher_is_better
    assert ranked["overall"].average_ranks.to_dict() == pytest.approx(toy.average_ranks.to_dict())
    assert set(tables["overall"].scores.stack()) <= {1.0, 2.0, 3.0, 4.0}


def test_overall_combines_families_that_share_a_direction(tmp_path):
    out = tmp_path / "out"
    for task, scale in (("toy", 1.0), ("big", 1e6)):
        for size in (1, 2, 3):
            for method, value in {"a + svd": 1.0, "b + svd": 2.0, "c + svd": 3.0}.items():
                if task == "big" and method != "c + svd":
                    value = 3.0 - value  # b beats a on "big"
                plant(out, method, {0: value * scale}, task=task, task_params={"size": size})
    cells, metrics = leaderboard.load(out)
    tables = leaderboard.score_tables(leaderboard.leaderboard(cells, metrics))
    assert tables["overall"].families == ["big", "toy"] and tables["overall"].scores.shape == (6, 3)
    overall = leaderboard.rankings(leaderboard.leaderboard(cells, metrics))["overall"]
    assert overall.average_ranks.to_dict() == {"a + svd": 1.5, "b + svd": 1.5, "c + svd": 3.0}
    assert overall.n == 6 and overall.friedman_p is not None


def test_empty_and_failed_folders(tmp_path):
    out = tmp_path / "out"
    plant(out, "uniform + svd", {0: 0.1, 1: 0.2}, status="error")
    cells, metrics = leaderboard.load(out)
    assert leaderboard.leaderboard(cells, metrics).empty and leaderboard.pairwise(cells, metrics).empty
    assert leaderboard.rankings(leaderboard.leaderboard(cells, metrics)) == {}
