"""The runner: statuses, failure isolation, hard timeouts, resume after SIGKILL, --force, tidy Parquet."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import GOOD_PLUGINS
from rankbench import results

REQUIRED_METRIC_COLUMNS = [
    "cell_id", "suite", "task", "selector", "factorization", "task_params", "selector_params",
    "factorization_params", "budget", "budget_kind", "seed", "status", "metric", "value", "unit",
    "higher_is_better", "started_at", "git_sha", "device",
]

TOY = """
name: toy
tasks: [{toy: {size: 24}}]
selectors: [uniform, oht]
factorizations: [toy-svd]
budgets: [0.5, 0.25]
seeds: [0, 1]
timeout: 30
"""


def test_inprocess_run_writes_tidy_tables_and_shares_setup(cli, write_suite, tmp_path):
    out = tmp_path / "out"
    result = cli("run", write_suite(TOY), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")
    assert result.returncode == 0, result.stderr
    metrics = pd.read_parquet(out / "metrics")
    assert set(REQUIRED_METRIC_COLUMNS) <= set(metrics.columns)
    assert set(metrics["status"]) == {"ok"}
    cells = results.read_table(out, "cells")
    assert len(cells) == 2 * (1 + 2 + 1)  # per seed: reference, uniform x 2 budgets, oht
    recorded = metrics.groupby("cell_id")["metric"].apply(set)
    for name in ("params", "param_ratio", "time_total_s", "time_setup_s", "peak_rss_mb", "rel_error"):
        assert all(name in names for names in recorded), name
    # the expensive set-up ran once per task configuration and seed, not once per cell
    setups = metrics[metrics["metric"] == "setups_in_process"]["value"]
    assert setups.max() <= 2
    # uniform at 0.5 keeps at most half the parameters; the reference keeps all
    ratio = metrics[metrics["metric"] == "param_ratio"].set_index("cell_id")["value"]
    for _, cell in cells.iterrows():
        if cell["selector"] == "uniform":
            assert ratio[cell["cell_id"]] <= cell["budget"]
        if cell["selector"] == "none":
            assert ratio[cell["cell_id"]] == 1.0
    ranks = pd.read_parquet(out / "ranks")
    assert set(ranks.columns) >= {"cell_id", "site", "rank", "params"}
    assert set(ranks["site"]) == {"layer0", "layer1"}
    assert list((out / "runs").glob("*.json"))
    env = json.loads(next((out / "runs").glob("*.json")).read_text())["environment"]
    assert {"python", "cpu", "torch_threads", "device", "packages", "git_sha"} <= set(env)


def test_cpu_runs_repeat_exactly(cli, write_suite, tmp_path):
    path = write_suite(TOY)
    for name in ("a", "b"):
        assert cli("run", path, "--out", tmp_path / name, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess").returncode == 0
    a, b = (pd.read_parquet(tmp_path / n / "metrics") for n in "ab")
    key = ["cell_id", "metric"]
    quality = lambda df: df[df["metric"] == "rel_error"].sort_values(key).reset_index(drop=True)[key + ["value"]]
    pd.testing.assert_frame_equal(quality(a), quality(b))
    seeds = quality(a).merge(results.read_table(tmp_path / "a", "cells")[["cell_id", "selector", "budget", "seed"]])
    per_seed = seeds[seeds["selector"] == "uniform"].groupby("seed")["value"].apply(tuple)
    assert per_seed[0] != per_seed[1]  # different seeds see different problem instances


def test_misbehaving_plugins_become_failed_cells(cli, write_suite, tmp_path):
    suite = write_suite("""
    name: misbehave
    tasks: [{toy: {size: 12}}]
    selectors: [uniform]
    factorizations:
      - {misbehave: {mode: raise}}
      - {misbehave: {mode: hang}}
      - {misbehave: {mode: exit}}
      - {misbehave: {mode: kill}}
      - {misbehave: {mode: nan}}
      - {misbehave: {mode: diverge}}
      - {misbehave: {mode: oom}}
      - toy-svd
    budgets: [0.5]
    timeout: 4
    """)
    out = tmp_path / "out"
    result = cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS)
    assert result.returncode == 1
    cells = results.read_table(out, "cells")
    status = {json.loads(p).get("mode", "ok"): s for p, s in zip(cells["factorization_params"], cells["status"])}
    assert status == {
        "raise": "error", "hang": "timeout", "exit": "crashed", "kill": "crashed",
        "nan": "diverged", "diverge": "diverged", "oom": "oom", "ok": "ok",
    }
    reasons = dict(zip(cells["status"] + ":" + cells["factorization_params"], cells["reason"]))
    assert any("exited with code 3" in r for r in reasons.values())
    assert any("SIGKILL" in r for r in reasons.values())
    tracebacks = cells[cells["status"] == "error"]["traceback"].iloc[0]
    assert "ValueError: this factorization always fails" in tracebacks
    # a timed-out cell is killed at its limit, not when it chooses to stop
    wall = cells[cells["status"] == "timeout"]["wall_s"].iloc[0]
    assert 4 <= wall < 15


def test_inprocess_timeout_interrupts_python_code(cli, write_suite, tmp_path):
    suite = write_suite("""
    name: hang
    tasks: [toy]
    selectors: [uniform]
    factorizations: [{misbehave: {mode: hang}}]
    budgets: [0.5]
    timeout: 1
    """)
    out = tmp_path / "out"
    assert cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess").returncode == 1
    cells = results.read_table(out, "cells")
    assert cells.set_index("selector").loc["uniform", "status"] == "timeout"


def test_resume_retries_failures_and_force_reruns(cli, write_suite, tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = write_suite(TOY)
    args = ("run", path, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")
    assert cli(*args).returncode == 0
    first = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    # pretend one cell failed last time: the next run retries exactly that one
    failed_id = first.index[1]
    table = results.read_table(out, "cells")
    row = table[table["cell_id"] == failed_id].assign(status="error")
    import pyarrow as pa

    results._write_atomic(pa.Table.from_pandas(row, schema=results.SCHEMAS["cells"], preserve_index=False), out / "cells", failed_id)
    result = cli(*args)
    assert "resuming: 7 of 8" in result.stderr
    second = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    changed = [cid for cid in first.index if first[cid] != second[cid]]
    assert changed == [failed_id]
    assert cli(*args, "--force").returncode == 0
    third = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    assert all(third[cid] != second[cid] for cid in first.index)


def wait_for_cells(out, count: int, timeout: float = 120) -> None:
    """Until a running `bench run` has finished ``count`` cells in ``out`` (or ``timeout`` seconds passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "cells").glob("part-*.parquet"))) < count:
        time.sleep(0.05)


def test_sigkill_mid_run_then_resume_gives_each_cell_exactly_once(write_suite, tmp_path):
    suite = write_suite("""
    name: killme
    tasks: [{toy: {size: 10, work_s: 0.25}}]
    selectors: [uniform]
    factorizations: [toy-svd]
    budgets: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    seeds: [0, 1]
    """)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rankbench.cli", "run", str(suite), "--out", str(out), "--plugins-dir", str(GOOD_PLUGINS)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_cells(out, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(results.cell_statuses(out))
    assert 5 <= done_before < 18
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"resuming: {done_before} of 18" in finished.stderr
    cells = results.read_table(out, "cells")
    assert len(cells) == 18 and cells["cell_id"].is_unique and set(cells["status"]) == {"ok"}
    metrics = pd.read_parquet(out / "metrics")
    assert metrics.groupby(["cell_id", "metric"]).size().max() == 1
    assert metrics["cell_id"].nunique() == 18


def test_a_timeout_ends_the_processes_a_cell_started(cli, write_suite, tmp_path, monkeypatch):
    """The worker's whole process group is killed at the limit: a child the method forked does not outlive it."""
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("TOY_CHILD_PIDFILE", str(pidfile))
    suite = write_suite("""
    name: fork
    tasks: [{toy: {size: 12}}]
    selectors: [uniform]
    factorizations: [{misbehave: {mode: fork-hang}}]
    budgets: [0.5]
    timeout: 4
    """)
    out = tmp_path / "out"
    assert cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "subprocess").returncode == 1
    cells = results.read_table(out, "cells")
    timed_out = cells[cells["status"] == "timeout"]
    assert len(timed_out) == 1 and "(2 processes ended)" in timed_out["reason"].item()
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the cell's child {child} is still running after its cell timed out")


def test_a_keyboard_interrupt_raised_by_a_plugin_is_a_failed_cell_in_process(cli, write_suite, tmp_path):
    suite = write_suite("""
    name: interrupt
    tasks: [{toy: {size: 12}}]
    selectors: [uniform]
    factorizations: [{misbehave: {mode: interrupt}}, toy-svd]
    budgets: [0.5]
    """)
    out = tmp_path / "out"
    result = cli("run", suite, "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")
    assert result.returncode == 1, result.stderr
    status = dict(zip(results.read_table(out, "cells")["factorization"], results.read_table(out, "cells")["status"]))
    assert status == {"misbehave": "error", "toy-svd": "ok", "dense": "ok"}


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT", "SIGINT"]])
def test_a_stop_signal_saves_finished_cells_and_says_so(write_suite, tmp_path, signals):
    """SIGTERM exits 143 with a message; repeated Ctrl-C during the clean-up prints no 'Exception ignored' trace."""
    suite = write_suite("""
    name: stopme
    tasks: [{toy: {size: 10, work_s: 0.3}}]
    selectors: [uniform]
    factorizations: [toy-svd]
    budgets: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    """)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rankbench.cli", "run", str(suite), "--out", str(out), "--plugins-dir",
               str(GOOD_PLUGINS)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_cells(out, 3)
    for name in signals:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=60)
    expected = 143 if signals == ["SIGTERM"] else 130
    assert proc.returncode == expected, stderr[-2000:]
    assert ("terminated" if expected == 143 else "interrupted") + ": finished cells are saved" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert 3 <= len(results.cell_statuses(out)) < 9


def test_resume_with_nothing_to_do_sets_nothing_up(cli, write_suite, tmp_path):
    """A finished suite is answered from its results folder alone: the counts, exit 0, no new run record -- and in a
    fresh interpreter without importing torch or pandas (the cells would be the first to need them)."""
    suite = write_suite("""
    name: finished
    tasks: [{matrix-recovery: {problem: completion, shape: [20, 15], rank: 2, max_iters: 20}}]
    selectors: [uniform]
    factorizations: [gd]
    budgets: [3]
    seeds: [0]
    """)
    out = tmp_path / "out"
    args = ["run", str(suite), "--out", str(out), "--executor", "inprocess", "--device", "cpu"]
    assert cli(*args).returncode == 0
    records = sorted((out / "runs").glob("*.json"))
    probe = (f"import sys\nfrom rankbench.cli import main\ncode = main({args!r})\n"
             "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas', 'scipy'}))\n"
             "sys.exit(code)")
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing to run: all 2 cells already finished" in again.stderr
    assert "HEAVY []" in again.stdout
    assert "ok" in again.stdout
    assert sorted((out / "runs").glob("*.json")) == records
