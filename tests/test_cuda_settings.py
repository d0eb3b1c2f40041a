"""The CUDA path without a GPU: where ``device: auto`` puts each task (``Task.gpu_benefit``), CUDA initialised before
a cell's first phase (so every CUDA cell has ``peak_cuda_mb``), and ``bench run --deterministic`` reaching the process
that runs cells (in-process, subprocess worker, scale-out job) and the run's environment record. CUDA itself is
replaced by fakes of the ``torch.cuda`` functions the host calls; the assertions are on what the host did with them."""

import json
import os
import textwrap
from types import SimpleNamespace

import pandas as pd
import pytest

from rankbench import envinfo, results, runner
from rankbench.cli import _prepare
from rankbench.plugins import load_plugins
from rankbench.suite import expand, load_suite

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CUBLAS = "CUBLAS_WORKSPACE_CONFIG"

# A task that reports, as cell notes, the torch settings of the process running its cell.
PROBE_PLUGIN = '''
import os

from rankbench import COMPRESSION, PARAM_RATIO, Factorization, SelfRunningTask, hookimpl


class Probe(SelfRunningTask):
    name = "probe"
    problem_kind = COMPRESSION
    budget_kind = PARAM_RATIO
    primary_metric = "rel_error"

    def _report(self, ctx):
        import torch

        with ctx.phase("work"):
            pass
        ctx.note("pid", os.getpid())
        ctx.note("deterministic_algorithms", torch.are_deterministic_algorithms_enabled())
        ctx.note("cudnn_deterministic", torch.backends.cudnn.deterministic)
        ctx.note("cudnn_benchmark", torch.backends.cudnn.benchmark)
        ctx.note("cublas_workspace_config", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
        ctx.metric("rel_error", 0.0, higher_is_better=False)
        ctx.metric("params", 1)
        ctx.metric("param_ratio", 1.0)

    def run_reference(self, ctx):
        self._report(ctx)

    def run(self, ctx, selector, factorization):
        self._report(ctx)


class ProbeFactorization(Factorization):
    name = "probe-fact"


@hookimpl
def rankbench_register_tasks(register):
    register(Probe)


@hookimpl
def rankbench_register_factorizations(register):
    register(ProbeFactorization)
'''

PROBE_SUITE = """
name: probe
tasks: [probe]
selectors: [uniform]
factorizations: [probe-fact]
budgets: [0.5]
timeout: 120
"""


@pytest.fixture
def torch_settings(monkeypatch):
    """A clean slate for the process-wide settings ``--deterministic`` changes, restored afterwards."""
    import torch

    monkeypatch.delenv(CUBLAS, raising=False)  # restored by monkeypatch, whatever the code under test set
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
    yield torch
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@pytest.fixture
def probe_dir(tmp_path):
    folder = tmp_path / "probe_plugins"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE_PLUGIN)
    return folder


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` as seen on a machine with one GPU that nothing has touched yet: uninitialised until
    ``torch.cuda.init()``; every phase allocates a peak of 48 MiB. Records what the host called."""
    import torch

    calls = SimpleNamespace(inits=0, set_device=[], seeds=[], cublas_at_init=None, phase_starts_initialised=[])
    state = {"initialised": False}

    def init():
        calls.inits += 1
        calls.cublas_at_init = os.environ.get(CUBLAS)
        state["initialised"] = True

    def reset_peak_memory_stats(*args, **kwargs):
        calls.phase_starts_initialised.append(state["initialised"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["initialised"])
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.set_device.append(index))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 48 * 2**20)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.seeds.append(int(seed)))
    return calls


def _suite(tmp_path, text, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _probe_cells(tmp_path, probe_dir, device):
    registry = load_plugins(str(probe_dir))
    cells = expand(load_suite(_suite(tmp_path, PROBE_SUITE)), registry, device, 120.0)
    return registry, sorted(cells, key=lambda c: not c.is_reference)  # the reference first, as the runner orders


def _notes(out):
    cells = results.read_table(out, "cells")
    return {row["selector"]: json.loads(row["notes"]) for _, row in cells.iterrows()}


def _environment(out):
    (record,) = list((out / "runs").glob("*.json"))
    return json.loads(record.read_text())["environment"]


# -- device: auto ------------------------------------------------------------------------------------------------------

ALL_TASKS = """
name: devices
tasks:
  - matrix-recovery: {problem: completion, shape: [30, 20], rank: 2}
  - pinn: {pde: poisson, source: 1, width: 8, depth: 2, pretrain_steps: 20, n_interior: 64, n_boundary: 16,
           test_grid: 16, problem: compression}
  - mlp-classification: {dataset: digits, hidden: [16], epochs: 1}
  - vit-classification: {dataset: digits, patch: 2, dim: 32, depth: 2, heads: 4, epochs: 1}
  - cnn-classification: {dataset: digits}
  - llm-perplexity: {model: smollm2-135m, seq_len: 128, max_eval_tokens: 512, calib_samples: 4, lm_eval: false}
selectors: [uniform]
factorizations: [svd]
budgets: {rank_cap: [2], param_ratio: [0.5]}
"""
SMALL_TASKS = {"matrix-recovery", "pinn", "mlp-classification"}
GPU_TASKS = {"vit-classification", "cnn-classification", "llm-perplexity"}


def _devices(suite, device, monkeypatch, gpu: bool):
    import torch

    monkeypatch.setattr(envinfo, "gpu_driver_present", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    args = SimpleNamespace(suite=str(suite), plugins_dir=None, device=device, timeout=None)
    _, _, run_device, _, cells, _ = _prepare(args)
    by_task: dict[str, set] = {}
    for cell in cells:
        by_task.setdefault(cell.task, set()).add(cell.device)
    return run_device, by_task


def test_auto_keeps_tasks_without_gpu_benefit_on_the_cpu(tmp_path, monkeypatch):
    suite = _suite(tmp_path, ALL_TASKS)
    run_device, by_task = _devices(suite, None, monkeypatch, gpu=True)
    assert run_device == "cuda"  # the run's device, as recorded, is what auto resolved to
    assert by_task == {**{t: {"cpu"} for t in SMALL_TASKS}, **{t: {"cuda"} for t in GPU_TASKS}}
    # the suite's own `device: auto` reads the same
    run_device, by_task_from_suite = _devices(_suite(tmp_path, ALL_TASKS + "device: auto\n", "auto.yaml"), None,
                                              monkeypatch, gpu=True)
    assert by_task_from_suite == by_task


def test_an_explicit_cuda_request_runs_every_task_on_the_gpu(tmp_path, monkeypatch):
    run_device, by_task = _devices(_suite(tmp_path, ALL_TASKS), "cuda", monkeypatch, gpu=True)
    assert run_device == "cuda" and by_task == {t: {"cuda"} for t in SMALL_TASKS | GPU_TASKS}
    # ... also when the suite asks for it
    _, by_task = _devices(_suite(tmp_path, ALL_TASKS + "device: cuda\n", "cuda.yaml"), None, monkeypatch, gpu=True)
    assert by_task == {t: {"cuda"} for t in SMALL_TASKS | GPU_TASKS}


def test_without_a_gpu_auto_and_cpu_run_everything_on_the_cpu(tmp_path, monkeypatch):
    for device in (None, "auto", "cpu"):
        run_device, by_task = _devices(_suite(tmp_path, ALL_TASKS), device, monkeypatch, gpu=False)
        assert run_device == "cpu" and by_task == {t: {"cpu"} for t in SMALL_TASKS | GPU_TASKS}


def test_gpu_benefit_is_declared_by_the_small_built_in_tasks():
    registry = load_plugins()
    declared = {name: registry.get("task", name).cls.gpu_benefit for name in SMALL_TASKS | GPU_TASKS}
    assert declared == {**{t: False for t in SMALL_TASKS}, **{t: True for t in GPU_TASKS}}
    small, large = SimpleNamespace(gpu_benefit=False), SimpleNamespace(gpu_benefit=True)
    assert envinfo.task_device(small, "auto", "cuda") == "cpu"
    assert envinfo.task_device(small, None, "cuda") == "cpu"  # no request is auto
    assert envinfo.task_device(small, "cuda", "cuda") == "cuda"
    assert envinfo.task_device(large, "auto", "cuda") == "cuda"
    assert envinfo.task_device(small, "auto", "cpu") == envinfo.task_device(large, "auto", "cpu") == "cpu"


def test_bench_check_names_the_tasks_auto_keeps_on_the_cpu(cli, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(envinfo, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = cli("check", _suite(tmp_path, ALL_TASKS))
    assert result.returncode == 0, result.stderr
    assert "on cuda (auto keeps matrix-recovery, mlp-classification, pinn on the cpu" in result.stdout


# -- CUDA initialised before the first phase -------------------------------------------------------------------------


def test_every_cuda_cell_records_peak_cuda_mb_from_the_first_one(tmp_path, probe_dir, fake_cuda):
    registry, cells = _probe_cells(tmp_path, probe_dir, "cuda")
    runtime = runner.Runtime(registry=registry, device="cuda", timeout=None)
    records = [runner.execute_cell(cell, runtime) for cell in cells]
    assert [r.status for r in records] == ["ok", "ok"]
    for record in records:  # the first cell of the process included
        peaks = [m["value"] for m in record.metrics if m["metric"] == "peak_cuda_mb"]
        assert peaks == [48.0], record.cell_id
    assert fake_cuda.inits == 1  # once per process
    # every phase (setup and work, of both cells) began with CUDA initialised, the very first one included
    assert len(fake_cuda.phase_starts_initialised) == 4 and all(fake_cuda.phase_starts_initialised)
    assert fake_cuda.set_device == []  # plain "cuda": the current device
    # torch.manual_seed seeded the CUDA generators with each cell's seed
    assert fake_cuda.seeds == [cell.cell_seed for cell in cells]


def test_cpu_cells_leave_cuda_alone(tmp_path, probe_dir, fake_cuda):
    registry, cells = _probe_cells(tmp_path, probe_dir, "cpu")
    runtime = runner.Runtime(registry=registry, device="cpu", timeout=None)
    record = runner.execute_cell(cells[0], runtime)
    assert record.status == "ok"
    assert fake_cuda.inits == 0 and not any(m["metric"] == "peak_cuda_mb" for m in record.metrics)


def test_init_cuda_selects_a_numbered_device(fake_cuda):
    runner.init_cuda("cuda:1")
    runner.init_cuda("cuda:1")
    assert fake_cuda.set_device == [1] and fake_cuda.inits == 1


def test_manual_seed_seeds_every_cuda_generator(monkeypatch):
    import torch

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(int(seed)))
    runner._seed_everything(1234)
    assert seeded == [1234]


# -- --deterministic ---------------------------------------------------------------------------------------------------

DETERMINISTIC = {"deterministic_algorithms": "True", "cudnn_deterministic": "True", "cudnn_benchmark": "False",
                 "cublas_workspace_config": ":4096:8"}
DEFAULT = {"deterministic_algorithms": "False", "cudnn_deterministic": "False", "cudnn_benchmark": "False",
           "cublas_workspace_config": ""}


def _settings(notes):
    return {key: notes[key] for key in DETERMINISTIC}


def test_deterministic_sets_the_cublas_workspace_before_cuda_initialises(tmp_path, probe_dir, fake_cuda,
                                                                          torch_settings):
    registry, cells = _probe_cells(tmp_path, probe_dir, "cuda")
    runtime = runner.Runtime(registry=registry, device="cuda", timeout=None, deterministic=True)
    record = runner.execute_cell(cells[0], runtime)
    assert record.status == "ok"
    assert fake_cuda.cublas_at_init == ":4096:8"
    assert _settings(record.notes) == DETERMINISTIC


def test_deterministic_keeps_the_other_reproducible_cublas_workspace(monkeypatch, torch_settings):
    monkeypatch.setenv(CUBLAS, ":16:8")
    runner.use_deterministic_torch()
    assert os.environ[CUBLAS] == ":16:8" and torch_settings.are_deterministic_algorithms_enabled()
    monkeypatch.setenv(CUBLAS, ":0:0")  # not reproducible: replaced
    runner.use_deterministic_torch()
    assert os.environ[CUBLAS] == ":4096:8"


def test_deterministic_in_process_sets_the_flags_and_is_recorded(cli, tmp_path, probe_dir, torch_settings):
    out = tmp_path / "out"
    result = cli("run", _suite(tmp_path, PROBE_SUITE), "--out", out, "--plugins-dir", probe_dir,
                 "--executor", "inprocess", "--device", "cpu", "--deterministic")
    assert result.returncode == 0, result.stderr
    notes = _notes(out)
    assert set(notes) == {"none", "uniform"}
    for cell_notes in notes.values():
        assert cell_notes["pid"] == str(os.getpid())
        assert _settings(cell_notes) == DETERMINISTIC
    env = _environment(out)
    assert env["deterministic"] is True and env["device"] == "cpu"


def test_the_subprocess_worker_applies_the_switch_itself(tmp_path, probe_dir, torch_settings):
    from rankbench_plugins.executors.subprocess_executor import SubprocessExecutor

    registry, cells = _probe_cells(tmp_path, probe_dir, "cpu")
    runtime = runner.Runtime(registry=registry, device="cpu", timeout=120, plugins_dir=str(probe_dir),
                             deterministic=True)
    records = list(SubprocessExecutor().run(cells, runtime))
    assert [r.status for r in records] == ["ok", "ok"], [r.reason for r in records]
    for record in records:
        assert record.notes["pid"] != str(os.getpid())  # ran in the worker
        assert _settings(record.notes) == DETERMINISTIC
    assert CUBLAS not in os.environ  # the host set nothing: the worker did it from the flag it was given
    assert not torch_settings.are_deterministic_algorithms_enabled()


def test_the_suites_switch_reaches_the_worker(cli, tmp_path, probe_dir, torch_settings):
    suite = _suite(tmp_path, PROBE_SUITE + "deterministic: true\n")
    out = tmp_path / "on"
    result = cli("run", suite, "--out", out, "--plugins-dir", probe_dir, "--executor", "subprocess", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert all(_settings(n) == DETERMINISTIC and n["pid"] != str(os.getpid()) for n in _notes(out).values())
    assert _environment(out)["deterministic"] is True


def test_the_cli_overrides_the_suites_switch(cli, tmp_path, probe_dir, torch_settings):
    suite = _suite(tmp_path, PROBE_SUITE + "deterministic: true\n")
    out = tmp_path / "off"
    result = cli("run", suite, "--out", out, "--plugins-dir", probe_dir, "--executor", "inprocess", "--device", "cpu",
                 "--no-deterministic")
    assert result.returncode == 0, result.stderr
    assert all(_settings(n) == DEFAULT for n in _notes(out).values())
    assert _environment(out)["deterministic"] is False


def test_scale_out_jobs_get_the_switch(tmp_path, probe_dir, torch_settings):
    from rankbench_plugins.executors import _remote

    registry, _ = _probe_cells(tmp_path, probe_dir, "cpu")
    runtime = runner.Runtime(registry=registry, device="cpu", timeout=60, plugins_dir=str(probe_dir),
                             deterministic=True)
    settings = _remote.job_settings(runtime)
    assert settings["deterministic"] is True
    json.dumps(settings)  # plain data: it travels to another machine
    _remote._RUNTIMES.clear()
    try:
        job_runtime = _remote._runtime(settings)
        assert job_runtime.deterministic
        assert torch_settings.are_deterministic_algorithms_enabled() and os.environ[CUBLAS] == ":4096:8"
        assert torch_settings.backends.cudnn.deterministic and not torch_settings.backends.cudnn.benchmark
    finally:
        _remote._RUNTIMES.clear()



def test_a_reused_job_process_drops_an_earlier_jobs_switch(tmp_path, probe_dir, torch_settings):
    """A Ray worker process is reused across jobs: a job without --deterministic after one with it runs with the
    default (nondeterministic) settings again."""
    from rankbench_plugins.executors import _remote

    registry, _ = _probe_cells(tmp_path, probe_dir, "cpu")
    _remote._RUNTIMES.clear()
    try:
        for deterministic in (True, False):
            runtime = runner.Runtime(registry=registry, device="cpu", timeout=60, plugins_dir=str(probe_dir),
                                     deterministic=deterministic)
            job_runtime = _remote._runtime(_remote.job_settings(runtime))
            assert job_runtime.deterministic is deterministic
            assert torch_settings.are_deterministic_algorithms_enabled() is deterministic
            assert torch_settings.backends.cudnn.deterministic is deterministic
    finally:
        _remote._RUNTIMES.clear()


def test_test_plugin_cells_under_auto_follow_gpu_benefit(monkeypatch):
    """``bench test-plugin --device auto`` places its tiny cells as ``bench run`` does: on a GPU machine the tasks
    that declare ``gpu_benefit = False`` stay on the CPU; ``cuda`` puts every one on the GPU."""
    import torch

    from rankbench import conformance

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("rankbench.envinfo.gpu_driver_present", lambda: True)
    configs, problems = conformance.task_configs(load_plugins(None))
    assert configs and not problems
    exercises = [conformance.Exercise("reference", config) for config in configs]
    for requested in ("auto", "cuda"):
        by_task: dict[str, set] = {}
        for cell in conformance.build_cells(exercises, requested, 60.0):
            by_task.setdefault(cell.task, set()).add(cell.device)
        small = {"cpu"} if requested == "auto" else {"cuda"}
        assert SMALL_TASKS <= set(by_task) and GPU_TASKS & set(by_task)
        assert all(devices == (small if task in SMALL_TASKS else {"cuda"}) for task, devices in by_task.items())

# -- bit-identical training under --deterministic ------------------------------------------------------------------

MLP = ("{mlp-classification: {dataset: digits, max_train: 200, max_test: 100, hidden: [16], epochs: 2, "
       "batch_size: 64, calib_samples: 64, latency_repeats: 1}}")
PINN = ("{pinn: {pde: poisson, source: 1, width: 8, depth: 2, pretrain_steps: 20, n_interior: 64, n_boundary: 16, "
        "test_grid: 16, problem: adaptation, target: 2, steps: 6, retrain_steps: 3}}")
# a rank-adaptive training run of the MLP, a LoRA fine-tuning of the PINN, and the dense reference of each
TRAINING = f"""
name: det-training
slices:
  - {{tasks: [{MLP}], selectors: [dlrt], factorizations: [svd]}}
  - {{tasks: [{PINN}], selectors: [uniform], factorizations: [lora]}}
budgets: {{param_ratio: [0.5], rank_total: [4]}}
timeout: 300
"""
NOT_REPEATABLE = r"^(?:time_|latency_|peak_|seconds_to_tol|work_)"


def test_two_deterministic_training_runs_give_bit_identical_metrics(cli, tmp_path, torch_settings):
    suite = _suite(tmp_path, TRAINING)
    frames = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = cli("run", suite, "--out", out, "--executor", "inprocess", "--device", "cpu", "--threads", "1",
                     "--deterministic")
        assert result.returncode == 0, result.stderr
        metrics = pd.read_parquet(out / "metrics")
        metrics = metrics[~metrics["metric"].str.contains(NOT_REPEATABLE)]
        frames.append(metrics.sort_values(["cell_id", "metric"]).reset_index(drop=True)[["cell_id", "metric", "value"]])
    a, b = frames
    assert set(results.read_table(tmp_path / "a", "cells")["status"]) == {"ok"}
    assert {"accuracy", "l2re"} <= set(a["metric"])  # trained classifiers and fine-tuned PINNs were measured
    assert len(a) > 10
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # bit for bit, not within a tolerance
