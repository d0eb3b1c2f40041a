"""`bench compare A B`: cells matched by configuration (not cell_id), medians over seeds, changes judged against a
per-kind threshold and the seed noise; exit 1 only on quality regressions by default.

One tiny toy suite runs once (in-process); every test copies it and plants its change by re-writing cells with the
project's own writer (``results.write_cell``), exactly as ``bench run`` writes them.
"""

import json
import math
import shutil

import pandas as pd
import pytest

from conftest import GOOD_PLUGINS
from rankbench import results
from rankbench.api import CellRecord
from rankbench.cells import Cell
from rankbench.compare import FLOOR_NOTE, PAIRED_TIE_NOTE, TIME_FLOOR_S, judge, metric_kind, time_floor

SUITE = """
name: toy
tasks: [{toy: {size: 20}}]
selectors: [uniform, energy]
factorizations: [toy-svd]
budgets: [0.6, 0.3]
seeds: [0, 1, 2]
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from rankbench.cli import main

    folder = tmp_path_factory.mktemp("compare")
    suite = folder / "suite.yaml"
    suite.write_text(SUITE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKBENCH_CACHE", str(folder / "cache"))
        code = main(["run", str(suite), "--out", str(folder / "base"), "--plugins-dir", str(GOOD_PLUGINS),
                     "--executor", "inprocess"])  # fmt: skip
    assert code == 0
    return folder / "base"


@pytest.fixture
def pair(base, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    return a, b


def _is(row, selector, budget):
    return row["selector"] == selector and row["budget"] == budget


def rewrite(folder, edit=None, versions=None):
    """Re-write every cell of ``folder`` with ``results.write_cell``. ``edit(row, metrics)`` may change the metric
    values in place and return a new status; ``versions`` (a suffix) simulates a plugin code change: new cell ids."""
    cells = results.read_table(folder, "cells")
    metrics = results.read_table(folder, "metrics")
    ranks = results.read_table(folder, "ranks")
    curves = results.read_table(folder, "curves")
    for row in cells.to_dict("records"):
        plugin_versions = json.loads(row["versions"])
        if versions:
            plugin_versions = {k: v + versions for k, v in plugin_versions.items()}
        cell = Cell(
            suite=row["suite"], task=row["task"], task_params=json.loads(row["task_params"]),
            selector=row["selector"], selector_params=json.loads(row["selector_params"]),
            factorization=row["factorization"], factorization_params=json.loads(row["factorization_params"]),
            budget=None if pd.isna(row["budget"]) else float(row["budget"]),
            budget_kind=None if pd.isna(row["budget_kind"]) else row["budget_kind"],
            seed=int(row["seed"]), device=row["device"], versions=plugin_versions, timeout=None,
        )  # fmt: skip
        assert versions or cell.cell_id == row["cell_id"]  # the reconstruction is faithful
        own = [
            {k: m[k] for k in ("metric", "value", "unit", "higher_is_better")}
            for m in metrics[metrics["cell_id"] == row["cell_id"]].to_dict("records")
        ]
        status = (edit(row, own) if edit else None) or row["status"]
        record = CellRecord(
            cell_id=cell.cell_id, status=status, reason=row["reason"], traceback=row["traceback"], metrics=own,
            ranks=[{k: r[k] for k in ("site", "rank", "rank_per_mode", "params")}
                   for r in ranks[ranks["cell_id"] == row["cell_id"]].to_dict("records")],
            curves=[{k: c[k] for k in ("curve", "step", "value")}
                    for c in curves[curves["cell_id"] == row["cell_id"]].to_dict("records")],
            started_at=row["started_at"], wall_s=row["wall_s"], notes=json.loads(row["notes"]),
        )  # fmt: skip
        if cell.cell_id != row["cell_id"]:
            for table in results.TABLES:
                (folder / table / f"part-{row['cell_id']}.parquet").unlink(missing_ok=True)
        results.write_cell(folder, cell, record, {"git_sha": row["git_sha"], "device": row["device"]},
                           row["primary_metric"])  # fmt: skip


def scale(selector, budget, metric, factor):
    def edit(row, metrics):
        if _is(row, selector, budget):
            for m in metrics:
                if m["metric"] == metric:
                    m["value"] *= factor

    return edit


def set_values(selector, budget, metric, by_seed):
    def edit(row, metrics):
        if _is(row, selector, budget):
            for m in metrics:
                if m["metric"] == metric:
                    m["value"] = by_seed[int(row["seed"])]

    return edit


def table(out):
    return pd.read_csv(out / "compare.csv", keep_default_na=False)


def flagged(rows):
    return rows[rows["verdict"].isin(["regression", "improvement", "changed"])]


def test_identical_pair_passes_and_writes_outputs(cli, pair):
    a, b = pair
    result = cli("compare", a, b)
    assert result.returncode == 0, result.stderr
    out = b / "compare-vs-A"
    rows = table(out)
    assert len(rows) and flagged(rows).empty and set(rows["verdict"]) == {"unchanged"}
    assert {"rel_error", "time_total_s", "peak_rss_mb", "params", "sum_site_ranks"} <= set(rows["metric"])
    assert set(rows["seeds_a"]) == {3} and set(rows["seeds_b"]) == {3}
    assert (out / "compare.png").stat().st_size > 5000 and (out / "unmatched.csv").exists()
    assert not list(out.glob(".*"))  # no temporary files left behind
    assert "0 regressions, 0 improvements" in result.stdout and "5 configurations matched" in result.stdout


def test_planted_quality_regression_fails_even_across_new_cell_ids(cli, pair, tmp_path):
    a, b = pair
    rewrite(b, scale("uniform", 0.3, "rel_error", 3.0), versions="+edited")  # every cell id changes
    ids = lambda folder: set(results.read_table(folder, "cells")["cell_id"])  # noqa: E731
    assert not ids(a) & ids(b)
    out = tmp_path / "cmp"
    result = cli("compare", a, b, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = table(out)
    bad = flagged(rows)
    assert len(bad) == 1
    row = bad.iloc[0]
    assert (row["verdict"], row["kind"], row["metric"], row["selector"], row["budget"]) == (
        "regression", "quality", "rel_error", "uniform", "0.3")  # fmt: skip
    assert math.isclose(row["change_rel"], 2.0, rel_tol=1e-9) and math.isclose(row["change"], math.log(3.0))
    assert row["seeds_a"] == row["seeds_b"] == 3
    assert len(pd.read_csv(out / "unmatched.csv")) == 0  # matched by configuration despite the new ids
    assert "regression" in result.stdout and "FAILED" in result.stdout
    # regressions come first in the printed table
    assert result.stdout.index("regression  ") < result.stdout.index("0 improvements")


def test_improvement_is_reported_and_passes(cli, pair):
    a, b = pair
    rewrite(b, scale("energy", 0.6, "rel_error", 0.5))
    result = cli("compare", a, b)
    assert result.returncode == 0, result.stdout
    bad = flagged(table(b / "compare-vs-A"))
    assert list(bad["verdict"]) == ["improvement"] and list(bad["metric"]) == ["rel_error"]
    assert "-50.00%" in result.stdout and "1 improvements" in result.stdout


def test_change_inside_the_seed_noise_is_not_flagged(cli, pair):
    a, b = pair
    rewrite(a, set_values("uniform", 0.3, "rel_error", {0: 0.2, 1: 0.3, 2: 0.4}))  # range: ln 2
    rewrite(b, set_values("uniform", 0.3, "rel_error", {0: 0.26, 1: 0.39, 2: 0.52}))  # median x1.3 < x2
    result = cli("compare", a, b)
    assert result.returncode == 0, result.stdout
    rows = table(b / "compare-vs-A")
    assert flagged(rows).empty
    row = rows[(rows["metric"] == "rel_error") & (rows["selector"] == "uniform") & (rows["budget"] == "0.3")]
    assert list(row["verdict"]) == ["within noise"]
    assert "1 of them beyond the threshold but within the seed noise" in result.stdout


def test_time_regression_is_reported_but_fails_only_when_asked(cli, pair):
    a, b = pair
    rewrite(a, set_values("energy", 0.3, "time_total_s", {0: 0.10, 1: 0.11, 2: 0.12}))
    rewrite(b, set_values("energy", 0.3, "time_total_s", {0: 0.50, 1: 0.55, 2: 0.60}))
    result = cli("compare", a, b)
    assert result.returncode == 0, result.stdout
    bad = flagged(table(b / "compare-vs-A"))
    assert list(zip(bad["verdict"], bad["kind"], bad["metric"])) == [("regression", "time", "time_total_s")]
    assert cli("compare", a, b, "--fail-on", "quality,time").returncode == 1
    # a threshold above the change silences it
    relaxed = cli("compare", a, b, "--threshold", "time=5")
    assert relaxed.returncode == 0 and flagged(table(b / "compare-vs-A")).empty


def test_times_below_the_floor_are_noise_and_larger_ones_still_regress(cli, pair):
    """Two runs of identical cells: time_setup_s 5 us -> 1 ms (x200) is timer noise, not a regression; 50 ms ->
    500 ms (x10) still is."""
    a, b = pair
    assert "time_setup_s" in set(results.read_table(a, "metrics")["metric"])

    def times(setup, total):
        def edit(row, metrics):
            for m in metrics:
                if m["metric"] == "time_setup_s" and _is(row, "uniform", 0.3):
                    m["value"] = setup * (1 + 0.01 * int(row["seed"]))
                if m["metric"] == "time_factorize_s" and _is(row, "energy", 0.6):
                    m["value"] = total * (1 + 0.01 * int(row["seed"]))

        return edit

    rewrite(a, times(5e-6, 0.050))
    rewrite(b, times(1e-3, 0.500))
    result = cli("compare", a, b, "--fail-on", "quality,time")
    rows = table(b / "compare-vs-A")
    setup = rows[(rows["metric"] == "time_setup_s") & (rows["selector"] == "uniform") & (rows["budget"] == "0.3")]
    assert list(setup["verdict"]) == ["within noise"] and list(setup["note"]) == [FLOOR_NOTE]
    assert setup["change_rel"].iloc[0] > 100  # far beyond the 100 % time threshold, but below 10 ms on both sides
    bad = flagged(rows)
    assert list(zip(bad["verdict"], bad["metric"], bad["selector"])) == [("regression", "time_factorize_s", "energy")]
    assert result.returncode == 1  # the 50 ms -> 500 ms regression, with --fail-on time
    assert "times below 10 ms on both sides are noise" in result.stdout
    assert "times below the 10 ms floor" in result.stdout


def test_a_quality_change_that_ties_paired_over_seeds_is_noise(cli, pair):
    """The median moves beyond the threshold and both seed ranges (the range rule alone says regression), but seed
    by seed B is worse on two seeds and better on the third: the paired call is a tie, so it is noise."""
    a, b = pair
    rewrite(a, set_values("uniform", 0.3, "rel_error", {0: 1.00, 1: 1.05, 2: 1.10}))
    rewrite(b, set_values("uniform", 0.3, "rel_error", {0: 1.25, 1: 1.26, 2: 1.08}))
    result = cli("compare", a, b)
    assert result.returncode == 0, result.stdout
    rows = table(b / "compare-vs-A")
    row = rows[(rows["metric"] == "rel_error") & (rows["selector"] == "uniform") & (rows["budget"] == "0.3")].iloc[0]
    assert (row["verdict"], row["note"], row["paired_verdict"]) == ("within noise", PAIRED_TIE_NOTE, "tie")
    assert row["change"] > max(row["noise"], row["limit"])  # the range rule alone would call it a regression
    assert flagged(rows).empty
    assert "1 quality changes that tie paired over seeds" in result.stdout


def test_cells_in_only_one_side_are_listed(cli, pair):
    a, b = pair
    rewrite(b, lambda row, metrics: "error" if _is(row, "energy", 0.6) else None)
    for part in results.read_table(b, "cells").query("selector == 'uniform' and budget == 0.3")["cell_id"]:
        for name in results.TABLES:
            (b / name / f"part-{part}.parquet").unlink(missing_ok=True)
    result = cli("compare", a, b)
    assert result.returncode == 1, result.stdout  # a configuration that ran in A fails in B: a quality regression
    assert "1 configurations ran in A and fail in B (error)" in result.stdout
    unmatched = pd.read_csv(b / "compare-vs-A" / "unmatched.csv")
    assert sorted(zip(unmatched["selector"], unmatched["status_b"])) == [("energy", "error"), ("uniform", "missing")]
    assert "2 configurations in only one side" in result.stdout
    assert cli("compare", a, b, "--fail-on", "time").returncode == 0  # only time regressions fail this job


def test_a_side_without_ok_cells_and_metrics_on_one_side_only(cli, pair, tmp_path):
    a, b = pair
    new = {"metric": "new_count", "value": 1.0, "unit": "", "higher_is_better": None}
    rewrite(b, lambda row, metrics: metrics.append(new))
    result = cli("compare", a, b)
    assert result.returncode == 0, result.stdout
    rows = table(b / "compare-vs-A")
    assert set(rows.loc[rows["metric"] == "new_count", "verdict"]) == {"only in B"} and flagged(rows).empty
    rewrite(a, lambda row, metrics: "error")
    result = cli("compare", a, b, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stdout
    assert "5 configurations in only one side" in result.stdout and not (tmp_path / "cmp" / "compare.png").exists()


def test_damaged_results_and_an_out_that_is_a_file_exit_2(cli, pair, tmp_path):
    a, b = pair
    (tmp_path / "file").write_text("x")
    result = cli("compare", a, b, "--out", tmp_path / "file")
    assert result.returncode == 2 and "--out: expected a folder" in result.stderr
    next((a / "cells").glob("part-*.parquet")).write_bytes(b"junk")
    result = cli("compare", a, b)  # a damaged cell is left out with one warning; the rest is compared
    assert result.returncode != 2 and result.stderr.count("1 damaged cell(s) left out") == 1
    for cell in (a / "cells").glob("part-*.parquet"):
        cell.write_bytes(b"junk")
    result = cli("compare", a, b, "--out", tmp_path / "nothing")
    assert result.returncode == 2 and "no finished cells" in result.stderr
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere", "{b}"], "folder not found"),
        (["{tmp}", "{b}"], "expected a results folder"),
        (["{a}", "{b}", "--threshold", "quality=lots"], "--threshold: expected KIND=FRACTION"),
        (["{a}", "{b}", "--threshold", "speed=0.1"], "--threshold: expected KIND=FRACTION"),
        (["{a}", "{b}", "--threshold", "time=-1"], "--threshold: expected KIND=FRACTION"),
        (["{a}", "{b}", "--fail-on", "quality,speed"], "--fail-on: expected"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(cli, pair, tmp_path, args, message):
    a, b = pair
    out = tmp_path / "out"
    result = cli("compare", *[x.format(tmp=tmp_path, a=a, b=b) for x in args], "--out", out)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (b / "compare-vs-A").exists()


def test_judge_uses_log_ratios_for_positive_values_and_differences_otherwise():
    one = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    # perplexities spanning orders of magnitude: x2 and /2 are equally far
    worse = judge(one(1e7), one(2e7), 0.02, direction=-1)
    better = judge(one(1e7), one(5e6), 0.02, direction=-1)
    assert worse["scale"] == "log" and worse["verdict"] == "regression" and better["verdict"] == "improvement"
    assert math.isclose(worse["change"], -better["change"])
    # asv's rule: within (1 + t) either way is unchanged
    assert judge(one(100.0), one(101.9), 0.02, -1)["verdict"] == "unchanged"
    assert judge(one(100.0), one(100 / 1.019), 0.02, -1)["verdict"] == "unchanged"
    # zeros (the dense reference's rel_error) fall back to differences; float dust is not a change
    assert judge(one(0.0), one(0.0), 0.02, -1)["verdict"] == "unchanged"
    assert judge(one(0.0), one(1e-15), 0.02, -1)["verdict"] == "unchanged"
    linear = judge(one(0.0), one(0.1), 0.02, -1)
    assert linear["scale"] == "linear" and linear["verdict"] == "regression"
    # sizes: exact threshold, no direction
    assert judge(one(1000.0), one(1001.0), 0.0, 0)["verdict"] == "changed"
    assert judge(one(0.5), one(0.5 * (1 + 1e-12)), 0.0, 0)["verdict"] == "unchanged"
    # the time floor: both medians below it is noise in either direction; one side above it is judged as usual
    assert judge(one(5e-6), one(1e-3), 1.0, -1, floor=TIME_FLOOR_S) == {**judge(one(5e-6), one(1e-3), 1.0, -1),
                                                                        "verdict": "within noise", "note": FLOOR_NOTE}
    assert judge(one(1e-3), one(5e-6), 1.0, -1, floor=TIME_FLOOR_S)["verdict"] == "within noise"
    assert judge(one(0.05), one(0.5), 1.0, -1, floor=TIME_FLOOR_S)["verdict"] == "regression"
    assert judge(one(0.005), one(0.02), 1.0, -1, floor=TIME_FLOOR_S)["verdict"] == "regression"
    assert time_floor("latency_ms", "ms") == 10.0 and time_floor("time_setup_s", "s") == TIME_FLOOR_S
    # a paired tie is noise; a paired loss does not overrule the range rule either way
    assert judge(one(1.0), one(2.0), 0.02, -1, paired="tie")["verdict"] == "within noise"
    assert judge(one(1.0), one(2.0), 0.02, -1, paired="loss")["verdict"] == "regression"
    assert judge(one(1.0), one(1.01), 0.02, -1, paired="loss")["verdict"] == "unchanged"


def test_metric_kinds():
    assert metric_kind("ppl_token", "", False, primary=True) == "quality"
    assert metric_kind("accuracy", "", True) == "quality"
    assert metric_kind("word_perplexity", "", False) == "quality"
    assert metric_kind("time_factorize_s", "s", False) == "time"
    assert metric_kind("latency_ms", "ms", None) == "time"
    assert metric_kind("peak_rss_mb", "MiB", False) == "memory"
    assert metric_kind("peak_cuda_mb", "MiB", False) == "memory"
    assert metric_kind("params", "", None) == "size"
    assert metric_kind("param_ratio", "", None) == "size"
    assert metric_kind("rank_selected", "", None) == "size"
    assert metric_kind("eval_tokens", "tokens", None) == "other"
