"""The scale-out executors: ``submitit`` (its local executor stands in for SLURM) and ``ray`` (a local instance).

Both must give the in-process results (same cells, statuses, metric values except timing and memory), write the
cells' part files from the jobs themselves (the host only acknowledges them), turn failures into records, honour
the per-cell limit (the in-job alarm, and the host's hard kill for a call that ignores signals), and resume across
engines.
"""

import io
import os
import textwrap

import pandas as pd
import pytest

from conftest import GOOD_PLUGINS
from rankbench import results

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RECOVERY = """
name: scaleout
tasks:
  - matrix-recovery: {problem: completion, shape: [20, 15], rank: 2, max_iters: 30}
selectors: [oht, uniform]
factorizations: [gd, altmin]
budgets: [3]
seeds: [0, 1]
timeout: 60
"""

# reference, error, timeout (alarm), crashed (the job dies), ok -- in the order a job runs them
FAILURES = """
name: failures
tasks: [{toy: {size: 12}}]
selectors: [uniform]
factorizations:
  - {misbehave: {mode: raise}}
  - {misbehave: {mode: hang}}
  - {misbehave: {mode: exit}}
  - toy-svd
budgets: [0.5]
timeout: 1
"""

STUCK_PLUGIN = '''
"""A factorization stuck where the in-job alarm cannot reach it (SIGALRM, SIGINT blocked): only a hard kill ends it."""
import signal
import time

from rankbench import Factorization, hookimpl


class Stuck(Factorization):
    name = "stuck"

    def approximate(self, w, rank):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})
        time.sleep(300)


@hookimpl
def rankbench_register_factorizations(register):
    register(Stuck)
'''

STUCK = """
name: stuck
tasks: [{toy: {size: 12}}]
selectors: [uniform]
factorizations: [stuck, toy-svd]
budgets: [0.5]
timeout: 1
"""

NOT_MEASURED = ("time_", "peak_")


def run_suite(text, out, executor, tmp_path, plugins_dir=None):
    """Expand a suite and run it through ``run_cells`` with an executor instance (params that the CLI cannot pass)."""
    from rich.console import Console

    from rankbench.plugins import load_plugins
    from rankbench.runner import Runtime, run_cells
    from rankbench.suite import expand, load_suite

    path = tmp_path / f"{out.name}.yaml"
    path.write_text(textwrap.dedent(text))
    plugins_dir = str(plugins_dir) if plugins_dir else None
    registry = load_plugins(plugins_dir)
    suite = load_suite(path)
    cells = expand(suite, registry, "cpu", suite.spec.timeout)
    runtime = Runtime(registry=registry, device="cpu", timeout=suite.spec.timeout, plugins_dir=plugins_dir, threads=1)
    console = Console(file=io.StringIO())
    return run_cells(cells, out, runtime, executor, {"git_sha": "test", "device": "cpu"}, console=console)


def comparable(out):
    """What must not depend on the engine: cells and statuses, metric values (not timing/memory), ranks, curves."""
    cells = results.read_table(out, "cells")[["cell_id", "status", "reason"]].sort_values("cell_id")
    metrics = results.read_table(out, "metrics")
    metrics = metrics[~metrics["metric"].str.startswith(NOT_MEASURED)]
    metrics = metrics[["cell_id", "status", "metric", "value"]].sort_values(["cell_id", "metric"])
    ranks = results.read_table(out, "ranks").sort_values(["cell_id", "site"])
    curves = results.read_table(out, "curves").sort_values(["cell_id", "curve", "step"])
    return [t.reset_index(drop=True) for t in (cells, metrics, ranks, curves)]


def assert_same_results(a, b):
    for x, y in zip(comparable(a), comparable(b)):
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-9)


@pytest.fixture
def host_writes(monkeypatch):
    """Cell ids the host process writes (jobs in other processes write their own parts)."""
    written = []
    original = results.write_cell

    def counting(out, cell, record, *args, **kwargs):
        written.append(cell.cell_id)
        return original(out, cell, record, *args, **kwargs)

    monkeypatch.setattr(results, "write_cell", counting)
    return written


@pytest.fixture
def stuck_plugins(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy.py").write_text((GOOD_PLUGINS / "toy.py").read_text())
    (folder / "stuck.py").write_text(STUCK_PLUGIN)
    return folder


def statuses(out):
    cells = results.read_table(out, "cells")
    names = cells["factorization"] + cells["factorization_params"].str.extract(r'"mode": "(\w+)"')[0].fillna("")
    return dict(zip(names, cells["status"])), cells


# -- submitit --------------------------------------------------------------------------------------------------------


def submitit_executor(**params):
    from rankbench_plugins.executors.submitit_executor import SubmititExecutor

    return SubmititExecutor(SubmititExecutor.Params(**params))


def test_submitit_local_matches_inprocess_and_its_jobs_write_the_parts(tmp_path, host_writes):
    from rankbench_plugins.executors.inprocess_executor import InProcessExecutor

    inprocess = run_suite(RECOVERY, tmp_path / "inprocess", InProcessExecutor(), tmp_path)
    host_writes.clear()
    # two jobs: one per task configuration and seed is what grouping by set-up gives here (cells_per_job >= 5)
    counts = run_suite(RECOVERY, tmp_path / "submitit", submitit_executor(cluster="local", cells_per_job=5), tmp_path)
    assert counts == inprocess == {"ok": 10}
    assert host_writes == []  # every part came from a job; the host acknowledged them
    assert_same_results(tmp_path / "inprocess", tmp_path / "submitit")
    # the job files of successful jobs are tidied away
    assert not any((tmp_path / "submitit" / "submitit").rglob("*.pkl"))


def test_submitit_failures_become_records_and_a_dead_job_hands_on_its_cells(tmp_path):
    # all five cells in one job: error and timeout are the job's own records; the job dies in `exit`; a fresh job
    # runs toy-svd
    executor = submitit_executor(cluster="local", cells_per_job=10, start_allowance_s=60)
    counts = run_suite(FAILURES, tmp_path / "out", executor, tmp_path, GOOD_PLUGINS)
    status, cells = statuses(tmp_path / "out")
    assert status == {"dense": "ok", "misbehaveraise": "error", "misbehavehang": "timeout",
                      "misbehaveexit": "crashed", "toy-svd": "ok"}
    assert counts == {"ok": 2, "error": 1, "timeout": 1, "crashed": 1}
    reasons = dict(zip(cells["status"], cells["reason"]))
    assert "submitit job" in reasons["crashed"] and "died" in reasons["crashed"]
    assert "ValueError: this factorization always fails" in cells.set_index("status").loc["error", "traceback"]
    assert list((tmp_path / "out" / "submitit").rglob("*.err"))  # the dead job's log is kept


@pytest.mark.slow
def test_submitit_hard_limit_kills_a_job_that_ignores_the_alarm(tmp_path, stuck_plugins):
    executor = submitit_executor(cluster="local", cells_per_job=10, start_allowance_s=8)
    run_suite(STUCK, tmp_path / "out", executor, tmp_path, stuck_plugins)
    status, cells = statuses(tmp_path / "out")
    assert status == {"dense": "ok", "stuck": "timeout", "toy-svd": "ok"}
    assert "hard limit" in cells.set_index("status").loc["timeout", "reason"]


# A stand-in for SLURM's commands, enough for submitit: `sbatch` starts every array task at once in the background
# (SLURM_* variables set as SLURM does), `srun` runs its command with the log files it names, `sacct` reports the
# states the tasks left behind (RUNNING, then COMPLETED or FAILED). No time limits, no queue.
FAKE_SBATCH = """
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
if os.environ.get("FAKE_SBATCH_ERROR"):
    sys.exit("sbatch: error: " + os.environ["FAKE_SBATCH_ERROR"])
counter = state / "counter"
number = int(counter.read_text()) + 1 if counter.exists() else 1000
counter.write_text(str(number))
text = Path(sys.argv[-1]).read_text()
script = state / f"{number}.sh"  # SLURM keeps a copy: submitit moves the file once sbatch returns
script.write_text(text)
array = re.search(r"#SBATCH --array=0-(\\d+)", text)
for index in range(int(array.group(1)) + 1) if array else [None]:
    job_id = str(number) if index is None else f"{number}_{index}"
    unique = str(number) if index is None else str(number * 1000 + index)
    env = dict(os.environ, SLURM_JOB_ID=unique, SLURM_NTASKS="1", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
    if index is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(number), SLURM_ARRAY_TASK_ID=str(index))
    (state / job_id).write_text("RUNNING")
    done = state / job_id
    wrapper = f"bash {script}; test $? = 0 && s=COMPLETED || s=FAILED; echo $s > {done}.tmp; mv {done}.tmp {done}"
    subprocess.Popen(["sh", "-c", wrapper], env=env, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {number}")
"""

FAKE_SRUN = """
import os, subprocess, sys

args, files = sys.argv[1:], {}
while args[0].startswith("--"):
    if args[0] in ("--output", "--error"):
        files[args[0]], args = args[1], args[2:]
    else:
        args = args[1:]
env = os.environ
def path(template):
    for tag, value in (("%A", env.get("SLURM_ARRAY_JOB_ID", "")), ("%a", env.get("SLURM_ARRAY_TASK_ID", "")),
                       ("%j", env["SLURM_JOB_ID"]), ("%t", "0")):
        template = template.replace(tag, value)
    os.makedirs(os.path.dirname(template), exist_ok=True)
    return open(template, "a")
sys.exit(subprocess.call(args, stdout=path(files["--output"]), stderr=path(files["--error"])))
"""

FAKE_SACCT = """
import os, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
wanted = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for path in sorted(state.iterdir()):
    if "." not in path.name and path.name != "counter" and path.name.split("_")[0] in wanted:
        print(f"{path.name}|{path.read_text().strip()}|localhost")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    import sys

    state, bin_dir = tmp_path / "slurm-state", tmp_path / "slurm-bin"
    state.mkdir()
    bin_dir.mkdir()
    for name, code in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT), ("scancel", "")):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{code}")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    return state


def test_submitit_slurm_job_array_on_fake_slurm(tmp_path, fake_slurm, host_writes):
    # the SLURM path: one job array (sbatch --array), results through the shared folder, states through sacct
    # cluster None: srun is on the PATH, so SLURM
    executor = submitit_executor(cells_per_job=5, poll_s=0.1, keep_job_files=True)
    counts = run_suite(RECOVERY, tmp_path / "slurm", executor, tmp_path)
    assert counts == {"ok": 10}
    assert host_writes == []
    assert sorted(p.name for p in fake_slurm.iterdir()) == ["1000.sh", "1000_0", "1000_1", "counter"]  # one array
    assert "--array=0-1%2" in next((tmp_path / "slurm" / "submitit").rglob("*_submission.sh")).read_text()
    from rankbench_plugins.executors.inprocess_executor import InProcessExecutor

    run_suite(RECOVERY, tmp_path / "inprocess", InProcessExecutor(), tmp_path)
    assert_same_results(tmp_path / "inprocess", tmp_path / "slurm")


def test_submitit_refused_submission_fails_the_cells_not_the_run(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "invalid partition specified: nope")
    counts = run_suite(RECOVERY, tmp_path / "out", submitit_executor(slurm_partition="nope"), tmp_path)
    assert counts == {"crashed": 10}
    reasons = set(results.read_table(tmp_path / "out", "cells")["reason"])
    assert len(reasons) == 1 and "invalid partition specified: nope" in reasons.pop()


@pytest.mark.slow
def test_submitit_failures_on_fake_slurm(tmp_path, fake_slurm):
    # one job (1000) dies in `exit` (state FAILED): crashed; toy-svd goes to a fresh job (1001)
    executor = submitit_executor(cells_per_job=10, poll_s=0.2)
    counts = run_suite(FAILURES, tmp_path / "out", executor, tmp_path, GOOD_PLUGINS)
    status, cells = statuses(tmp_path / "out")
    assert status == {"dense": "ok", "misbehaveraise": "error", "misbehavehang": "timeout",
                      "misbehaveexit": "crashed", "toy-svd": "ok"}
    assert counts == {"ok": 2, "error": 1, "timeout": 1, "crashed": 1}
    assert "state FAILED" in cells.set_index("status").loc["crashed", "reason"]
    assert sorted(p.name for p in fake_slurm.iterdir() if "." not in p.name) == ["1000", "1001", "counter"]


@pytest.mark.parametrize("state, status", [("TIMEOUT", "timeout"), ("OUT_OF_MEMORY", "oom"), ("NODE_FAIL", "crashed")])
def test_submitit_slurm_states_of_a_dead_job(tmp_path, state, status):
    import time

    from rankbench.plugins import load_plugins
    from rankbench.suite import expand, load_suite
    from rankbench_plugins.executors._remote import PartWatch
    from rankbench_plugins.executors.submitit_executor import _Job

    class DeadJob:
        job_id = "7_0"

        def __init__(self, state):
            self.state = state

        def result(self):
            raise RuntimeError("Job 7_0 has not produced any output")

    (tmp_path / "s.yaml").write_text(textwrap.dedent(RECOVERY))
    cells = expand(load_suite(tmp_path / "s.yaml"), load_plugins(None), "cpu", 60)[:3]
    job = _Job(DeadJob(state), cells, 180.0, time.monotonic(), "2026-01-01T00:00:00.000+00:00")
    records, rest = submitit_executor()._collect(job, "slurm", PartWatch(str(tmp_path / "none")))
    # nothing on disk: the job died in its first cell; the two it never reached go to a fresh job
    assert [r.status for r in records] == [status] and rest == cells[1:]
    assert "7_0" in records[0].reason and "has not produced any output" in records[0].reason


def test_resume_across_engines_submitit_then_inprocess(cli, write_suite, tmp_path):
    out = tmp_path / "out"
    # seed 0 through submitit (debug cluster: jobs in this process, no scheduler), then the whole suite in-process
    run_suite(RECOVERY.replace("seeds: [0, 1]", "seeds: [0]"), out, submitit_executor(cluster="debug"), tmp_path)
    first = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    assert len(first) == 5
    result = cli("run", write_suite(RECOVERY), "--out", out, "--executor", "inprocess")
    assert result.returncode == 0, result.stderr
    assert "resuming: 5 of 10" in result.stderr
    second = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    assert len(second) == 10 and all(second[cid] == first[cid] for cid in first.index)


# -- ray -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def ray_executor(**params):
    from rankbench_plugins.executors.ray_executor import RayExecutor

    return RayExecutor(RayExecutor.Params(**params))


def test_ray_matches_inprocess_and_resumes_across_engines(ray_instance, cli, write_suite, tmp_path, host_writes):
    # part of the suite (seed 0) through Ray, then the whole of it through `bench run --executor ray` (resume), and
    # the whole suite in-process elsewhere: same tables
    out = tmp_path / "ray"
    run_suite(RECOVERY.replace("seeds: [0, 1]", "seeds: [0]"), out, ray_executor(), tmp_path)
    assert host_writes == []
    first = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    result = cli("run", write_suite(RECOVERY), "--out", out, "--executor", "ray")  # uses the running instance
    assert result.returncode == 0, result.stderr
    assert "resuming: 5 of 10" in result.stderr
    second = results.read_table(out, "cells").set_index("cell_id")["started_at"]
    assert all(second[cid] == first[cid] for cid in first.index)
    elsewhere = cli("run", write_suite(RECOVERY, "b.yaml"), "--out", tmp_path / "inprocess", "--executor", "inprocess")
    assert elsewhere.returncode == 0
    assert_same_results(tmp_path / "inprocess", out)
    # and back: an in-process re-run of the Ray folder has nothing left to do
    again = cli("run", write_suite(RECOVERY), "--out", out, "--executor", "inprocess")
    assert "nothing to run: all 10 cells already finished" in again.stderr and again.returncode == 0


def test_ray_failures_become_records(ray_instance, tmp_path):
    counts = run_suite(FAILURES, tmp_path / "out", ray_executor(), tmp_path, GOOD_PLUGINS)
    status, cells = statuses(tmp_path / "out")
    assert status == {"dense": "ok", "misbehaveraise": "error", "misbehavehang": "timeout",
                      "misbehaveexit": "crashed", "toy-svd": "ok"}
    assert counts == {"ok": 2, "error": 1, "timeout": 1, "crashed": 1}
    by_status = cells.set_index("status")
    assert "in-process alarm" in by_status.loc["timeout", "reason"]  # the task's own alarm, written by the task
    assert "WorkerCrashedError" in by_status.loc["crashed", "reason"]
    assert "ValueError: this factorization always fails" in by_status.loc["error", "traceback"]


@pytest.mark.slow
def test_ray_hard_limit_kills_a_task_that_ignores_the_alarm(ray_instance, tmp_path, stuck_plugins):
    run_suite(STUCK, tmp_path / "out", ray_executor(start_allowance_s=8), tmp_path, stuck_plugins)
    status, cells = statuses(tmp_path / "out")
    assert status == {"dense": "ok", "stuck": "timeout", "toy-svd": "ok"}
    assert "ray.cancel" in cells.set_index("status").loc["timeout", "reason"]
