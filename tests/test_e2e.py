"""End to end, as a user runs it: the shipped suites validate, and suites/smoke.yaml runs every task family."""

import json

import pandas as pd
import pytest
import yaml

import smoke_reference
from conftest import ROOT

SUITES = sorted((ROOT / "suites").glob("*.yaml"))


@pytest.mark.parametrize("suite", SUITES, ids=[s.stem for s in SUITES])
def test_shipped_suites_are_valid(cli, suite):
    result = cli("check", suite)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout


def test_smoke_suite_runs_every_task_and_reports(bench, tmp_path):
    out = tmp_path / "smoke"
    run = bench("run", ROOT / "suites" / "smoke.yaml", "--out", out, "--threads", "1")
    assert run.returncode == 0, run.stderr
    # the numbers are the reference's (tests/smoke_reference.py: what may differ, and how to regenerate it)
    failures, moved_ranks = smoke_reference.differences(out)
    assert not failures, "smoke metrics changed:\n" + "\n".join(failures)
    metrics = pd.read_parquet(out / "metrics")
    spec = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())
    listed = spec["tasks"] + [t for piece in spec.get("slices", []) for t in piece["tasks"]]
    tasks = {next(iter(t)) if isinstance(t, dict) else t for t in listed}
    assert tasks <= set(metrics.loc[metrics["status"] == "ok", "task"])
    # every rank-adaptive trainer of the slice ran and recorded a rank trajectory
    ok = metrics[metrics["status"] == "ok"]
    assert {"dlrt", "bayes-tensor"} <= set(ok.loc[ok["task"] == "mlp-classification", "selector"])
    curves = pd.read_parquet(out / "curves").merge(ok[["cell_id", "selector"]].drop_duplicates(), on="cell_id")
    assert {"dlrt", "bayes-tensor"} <= set(curves.loc[curves["curve"] == "rank_total", "selector"])
    # text facts travel through the worker into cells.notes (the LLM cells record their model's checksum)
    cells = pd.read_parquet(out / "cells")
    llm_notes = cells.loc[(cells["task"] == "llm-perplexity") & (cells["status"] == "ok"), "notes"].map(json.loads)
    assert len(llm_notes) and all(len(n["model_sha256"]) == 64 for n in llm_notes)
    # a second run resumes: nothing left to do
    again = bench("run", ROOT / "suites" / "smoke.yaml", "--out", out)
    assert again.returncode == 0 and "nothing to run: all 140 cells already finished" in again.stderr
    report = bench("report", out)
    assert report.returncode == 0, report.stderr
    assert (out / "report" / "report.md").exists() and (out / "report" / "quality_vs_params.png").exists()
