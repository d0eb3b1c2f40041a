"""`bench report`: summary statistics agree with an independent computation; plots and Markdown are written."""

import re

import pandas as pd

from conftest import GOOD_PLUGINS
from rankbench.api import CellRecord
from rankbench.cells import Cell
from rankbench.leaderboard import load
from rankbench.report import figure_names, rank_tables, site_order, summary_table
from rankbench.results import write_cell

SUITE = """
name: toy
tasks: [{toy: {size: 30}}, {toy: {size: 20}}]
selectors: [uniform, energy]
factorizations: [toy-svd, {misbehave: {mode: raise}}]
budgets: [0.6, 0.3]
seeds: [0, 1, 2]
"""


def test_report_tables_and_plots(cli, write_suite, tmp_path):
    out = tmp_path / "out"
    assert cli("run", write_suite(SUITE), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess").returncode == 1
    result = cli("report", out)
    assert result.returncode == 0, result.stderr
    folder = out / "report"
    text = (folder / "report.md").read_text()
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
        assert (folder / png).stat().st_size > 5000
    assert {"quality_vs_params.png", "time_per_method.png", "ranks_toy-size-30.png", "ranks_toy-size-20.png"} <= {
        p.name for p in folder.glob("*.png")
    }
    assert "## Failed cells" in text and "this factorization always fails" in text
    # the summary's median over seeds equals a direct pandas computation on the Parquet files
    metrics = pd.read_parquet(out / "metrics")
    direct = metrics[(metrics.metric == "rel_error") & (metrics.selector == "uniform") & (metrics.budget == 0.3)
                     & (metrics.factorization == "toy-svd") & metrics.task_params.str.contains('"size": 30')]
    assert len(direct) == 3
    _, loaded = load(out)
    summary = summary_table(loaded)
    row = summary[(summary.selector == "uniform") & (summary.budget == "0.3") & summary.task.str.contains("size=30")]
    assert row["value (median [min, max])"].iloc[0].startswith(f"{direct['value'].median():.4g} [")
    assert row["seeds"].iloc[0] == 3
    assert "uniform" in result.stdout and "rel_error" in result.stdout


def test_report_on_a_folder_that_is_not_results(cli, tmp_path):
    result = cli("report", tmp_path)
    assert result.returncode == 2 and "expected a results folder" in result.stderr


def _cell(selector: str, seed: int, task_params: dict | None = None) -> Cell:
    return Cell(suite="sites", task="toy", task_params=task_params or {"size": 12}, selector=selector,
                selector_params={}, factorization="toy-svd", factorization_params={}, budget=0.5,
                budget_kind="param_ratio", seed=seed, device="cpu", versions={}, timeout=None)


def _write(out, cell: Cell, sites: list[str]) -> None:
    ranks = [{"site": site, "rank": int(site.rsplit(".", 1)[1]), "rank_per_mode": "", "params": 1} for site in sites]
    record = CellRecord(cell_id=cell.cell_id, status="ok", ranks=ranks, started_at=f"2025-01-01T00:00:0{cell.seed}",
                        metrics=[{"metric": "rel_error", "value": 0.1}], primary_metric="rel_error")
    write_cell(out, cell, record, {"git_sha": "x", "device": "cpu"}, "rel_error")


def test_rank_heatmap_lists_sites_in_model_order(cli, tmp_path):
    """Sites recorded in model order [layer.1, layer.2, layer.10] are drawn in that order (not lexically: layer.10
    before layer.2), in a file named after the task configuration."""
    out = tmp_path / "out"
    for seed, selector in enumerate(["uniform", "energy", "uniform"]):
        _write(out, _cell(selector, seed), ["layer.1", "layer.2", "layer.10"])
    cells, _ = load(out)
    tables = rank_tables(cells, pd.read_parquet(out / "ranks"))
    assert list(tables) == ["toy"]
    assert list(tables["toy"].columns) == ["layer.1", "layer.2", "layer.10"]
    assert tables["toy"].loc["uniform + toy-svd @0.5", "layer.10"] == 10
    assert cli("report", out).returncode == 0
    assert (out / "report" / "ranks_toy.png").stat().st_size > 5000
    assert "](ranks_toy.png)" in (out / "report" / "report.md").read_text()


def test_site_order_follows_the_recording_not_the_names():
    def rows(*cells):
        return pd.DataFrame(
            [{"cell_id": cid, "site": site, "position": i} for cid, sites in cells for i, site in enumerate(sites)]
        )

    # recorded order wins over any sort of the names; a cell with fewer sites does not reorder the others
    recorded = rows(("a", ["net.3", "net.10", "net.1"]), ("b", ["net.10", "net.1"]))
    assert site_order(recorded) == ["net.3", "net.10", "net.1"]
    # merged from cells that each hold part of the model
    assert site_order(rows(("b", ["x.1", "x.3"]), ("a", ["x.0", "x.1", "x.2", "x.3"]))) == ["x.0", "x.1", "x.2", "x.3"]
    # cells that contradict each other: the order is not available, natural sort (digit runs as integers)
    contradicting = rows(("a", ["layer.10", "layer.2"]), ("b", ["layer.2", "layer.10"]))
    assert site_order(contradicting) == ["layer.2", "layer.10"]
    assert site_order(pd.DataFrame({"site": ["b.10.x", "b.2.x", "a.1"]})) == ["a.1", "b.2.x", "b.10.x"]


def test_figure_names_are_safe_and_unique():
    labels = ["toy", 'toy[mode="a/b"]', 'toy[mode="a b"]', "mlp[" + "x" * 100 + "]"]
    names = figure_names(labels, "ranks")
    assert names["toy"] == "ranks_toy.png"
    assert len(set(names.values())) == len(labels)
    assert all(re.fullmatch(r"ranks_[A-Za-z0-9._-]+\.png", name) for name in names.values())
    assert names['toy[mode="a/b"]'].startswith("ranks_toy-mode-a-b-")  # same slug as "a b": a hash tells them apart
    assert len(names["mlp[" + "x" * 100 + "]"]) < 90


def test_report_shows_intervals_paired_calls_and_rankings(cli, tmp_path):
    """Planted: on six configurations a < b < c < d in error by a constant on every one of 5 seeds; a second task
    family (2 seeds, higher is better) has no test. The report states intervals and seed counts, the paired calls
    against the dense reference and between methods, the rankings with Friedman p and CD, and draws cd_toy.png."""
    from test_leaderboard import REFERENCE, plant

    out = tmp_path / "out"
    level = {"a + svd": 0.1, "b + svd": 0.2, "c + svd": 0.3, "d + svd": 0.4}
    base = {seed: 1.0 + 0.3 * seed for seed in range(5)}  # a wide spread over seeds, the same for every method
    for size in (10, 20, 30):
        plant(out, REFERENCE, base, task_params={"size": size})
        for budget in (0.3, 0.6):
            for method, step in level.items():
                plant(out, method, {s: v + step for s, v in base.items()}, task_params={"size": size}, budget=budget)
    for method, step in level.items():
        plant(out, method, {0: 0.9 - step, 1: 0.8 - step}, task="cls", metric="accuracy", higher_is_better=True)
    result = cli("report", out)
    assert result.returncode == 0, result.stderr
    folder = out / "report"
    text = (folder / "report.md").read_text()
    # leaderboard: intervals, seed counts, the paired call against the dense reference
    assert "### toy[size=10]: rel_error (lower is better), 5 seeds ok per method" in text
    assert "### cls: accuracy (higher is better), 2 seeds ok per method" in text
    assert "0.75 (n=2: n too small)" in text and "(n=5)" in text
    assert "loss -0.1 [-0.1, -0.1] (n=5)" in text  # a + svd: worse than dense by 0.1 on every seed
    # pairwise: a beats b at both budgets, and the mirror
    section = text[text.index("## Pairwise (paired over seeds)"):text.index("## Rankings")]
    assert re.search(r"\| a \+ svd \|\s+\| WW\s+\| WW\s+\| WW\s+\|", section)
    assert re.search(r"\| d \+ svd \| LL\s+\| LL\s+\| LL\s+\|", section)
    assert "### cls (budget: 0.5)" in section and "| ?" in section
    # rankings: average ranks 1..4 over six configurations, a test and its diagram; none for cls
    rankings = text[text.index("## Rankings"):]
    assert "### toy (lower is better; 6 configurations)" in rankings and "Friedman p = " in rankings
    assert "Nemenyi CD = " in rankings and "![critical-difference diagram: toy](cd_toy.png)" in rankings
    assert (folder / "cd_toy.png").stat().st_size > 5000 and not (folder / "cd_cls.png").exists()
    assert "No Friedman test: it needs at least 3 methods and 5 configurations (here 4 and 1)." in rankings
    assert "No overall ranking: only toy has the direction most families share (left out: cls)." in rankings
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
        assert (folder / png).stat().st_size > 5000
    # the terminal: leaderboards, pairwise counts, rankings
    assert "toy[size=20]: rel_error (lower is better), 5 seeds ok per method" in result.stdout
    assert "pairwise (paired over seeds): 36 pairs decided, 0 tied, 6 with fewer than 3 common seeds" in result.stdout
    assert "toy (6 configurations): a + svd 1, b + svd 2, c + svd 3, d + svd 4; Friedman p=" in result.stdout
    board = pd.read_csv(folder / "leaderboard.csv")
    methods = board[~board["is_reference"]]
    calls = methods["vs_reference"].fillna("").groupby(methods["task"]).agg(set)
    assert calls["cls"] == {"no dense reference"} and {c.split()[0] for c in calls["toy"]} == {"loss"}
    assert len(pd.read_csv(folder / "pairwise.csv")) == 2 * 36 + 2 * 6
