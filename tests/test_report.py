"""`bench report`: summary statistics agree with an independent computation; plots and Markdown are written."""

import re

import pandas as pd

from conftest import GOOD_PLUGINS
from rankbench.report import summary_table, load

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
    assert {"quality_vs_params.png", "time_per_method.png", "ranks_0.png"} <= {p.name for p in folder.glob("*.png")}
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
