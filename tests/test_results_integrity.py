"""Damaged result files and concurrent runs: a cell is trusted only when its marker and parts verify; a damaged cell is
reported once, left out of every reader and re-run; a results folder takes one `bench run` at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import GOOD_PLUGINS, TOY_SUITE
from rankbench import results



@pytest.fixture
def finished(cli, write_suite, tmp_path):
    """A finished two-cell results folder (the reference and uniform at 0.5) and the suite that wrote it."""
    suite, out = write_suite(TOY_SUITE), tmp_path / "out"
    result = cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")
    assert result.returncode == 0, result.stderr
    cells = results.read_table(out, "cells")
    uniform = cells.loc[cells["selector"] == "uniform", "cell_id"].item()
    return suite, out, uniform


def rerun(cli, suite, out):
    return cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")


DAMAGE = {
    "metrics part truncated": lambda p: p.write_bytes(p.read_bytes()[:10]),
    "metrics part emptied": lambda p: p.write_bytes(b""),
    "metrics part deleted": lambda p: p.unlink(),
    "metrics part with a flipped byte": lambda p: p.write_bytes(p.read_bytes()[:-9] + b"X" + p.read_bytes()[-8:]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_part_is_reported_left_out_and_rerun(finished, cli, damage):
    suite, out, uniform = finished
    before = results.read_results(out)
    DAMAGE[damage](out / "metrics" / f"part-{uniform}.parquet")
    scan = results.scan_results(out)
    assert list(scan.damaged) == [uniform] and "metrics part" in scan.damaged[uniform]
    checked = cli("check-results", out)
    assert checked.returncode == 1 and f"damaged: cell {uniform}: metrics part" in checked.stdout
    # readers leave the cell out, with one warning
    assert uniform not in set(results.read_results(out)["cell_id"])
    report = cli("report", out)
    assert report.returncode == 0, report.stderr
    assert report.stderr.count("damaged cell(s) left out") == 1
    # a resume re-runs exactly that cell and says so once
    result = rerun(cli, suite, out)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"cell {uniform}") == 1 and "re-running" in result.stderr
    assert "1 of 2 cells already finished" in result.stderr
    after = results.read_results(out)
    quality = lambda df: (df[df["metric"].isin(["rel_error", "params", "param_ratio"])]  # timings differ
                          .sort_values(["cell_id", "metric"]).reset_index(drop=True)[["cell_id", "metric", "value"]])
    pd.testing.assert_frame_equal(quality(before), quality(after))
    assert set(before["metric"]) == set(after["metric"])
    assert cli("check-results", out).returncode == 0


@pytest.mark.parametrize("damage", ["truncated", "emptied", "a stranger's marker"])
def test_a_damaged_marker_never_stops_a_run(finished, cli, damage):
    suite, out, uniform = finished
    marker = out / "cells" / f"part-{uniform}.parquet"
    if damage == "truncated":
        marker.write_bytes(marker.read_bytes()[:20])
    elif damage == "emptied":
        marker.write_bytes(b"")
    else:  # another cell's marker copied over this one's name
        other = next(p for p in (out / "cells").glob("part-*.parquet") if p != marker)
        marker.write_bytes(other.read_bytes())
    assert uniform in results.scan_results(out).damaged
    result = rerun(cli, suite, out)
    assert result.returncode == 0, result.stderr
    assert "re-running" in result.stderr
    assert results.scan_results(out).damaged == {} and len(results.read_table(out, "cells")) == 2


def test_report_on_a_folder_without_finished_cells(cli, tmp_path):
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    result = cli("report", tmp_path / "empty")
    assert result.returncode == 2 and "no finished cells" in result.stderr
    assert not (tmp_path / "empty" / "report").exists()


def test_read_results_returns_ok_cells_unless_asked(cli, write_suite, tmp_path):
    suite = write_suite(TOY_SUITE.replace("toy-svd]", "toy-svd, {misbehave: {mode: raise}}]"))
    out = tmp_path / "out"
    assert cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess").returncode == 1
    cells = results.read_table(out, "cells")
    failed = set(cells.loc[cells["status"] == "error", "cell_id"])
    assert len(failed) == 1
    assert not failed & set(results.read_results(out)["cell_id"])
    assert failed <= set(results.read_results(out, include_failed=True)["cell_id"])


def test_a_second_run_into_a_held_folder_names_the_holder(finished, cli, tmp_path):
    """The lock is an OS lock: a second `bench run` exits 2 naming the holder; when the holder dies, it is free."""
    suite, out, _ = finished
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from rankbench.files import FolderLock\n"
         "with FolderLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        runs_before = sorted((out / "runs").iterdir())
        started = time.monotonic()
        result = rerun(cli, suite, out)
        assert result.returncode == 2 and f"pid {holder.pid}" in result.stderr and "in use" in result.stderr
        assert time.monotonic() - started < 30
        assert sorted((out / "runs").iterdir()) == runs_before  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert rerun(cli, suite, out).returncode == 0  # a dead holder's lock never blocks
    assert (out / ".lock").exists() and os.path.getsize(out / ".lock") > 0
