"""``bench test-plugin NAME``: built-ins pass the conformance checks; broken third-party plugins fail the right check."""

import textwrap

import pytest

from conftest import BROKEN_PLUGINS


@pytest.fixture(autouse=True)
def _checks_in_this_process(monkeypatch):
    """The checks run in this process (the supervising parent that turns a crash into a failed check is tested in
    test_plugins_host with a segfaulting selector)."""
    monkeypatch.setenv("RANKBENCH_TEST_PLUGIN_SUPERVISED", "1")

BROKEN_SELECTORS = '''
from rankbench import COMPRESSION, PARAM_RATIO, PluginParams, Selector, hookimpl
from pydantic import Field


class FullRank(Selector):
    """Ignores its budget: every site keeps its full rank."""

    name = "full-rank"
    description = "keeps every site at full rank, whatever the budget"
    problem_kinds = frozenset({COMPRESSION})
    budget_kinds = frozenset({PARAM_RATIO})

    def select(self, problem):
        return {site.name: site.max_rank for site in problem.sites}


CALLS = [0]


class Drifting(Selector):
    """Respects its budget, but its answer depends on hidden state (how often it was called before), as a selector
    drawing from an unseeded generator would: the same cell gives other ranks when it runs again."""

    name = "drifting"
    description = "rank 1 or 2 per site, alternating from call to call"
    problem_kinds = frozenset({COMPRESSION})
    budget_kinds = frozenset({PARAM_RATIO})

    def select(self, problem):
        CALLS[0] += 1
        return {site.name: 1 + CALLS[0] % 2 for site in problem.sites}


class Undeclared(Selector):
    name = "undeclared"  # no description, and a parameter without a default

    class Params(PluginParams):
        alpha: float
        beta: int = Field(2, description="documented")

    def select(self, problem):
        return {site.name: 1 for site in problem.sites}


@hookimpl
def rankbench_register_selectors(register):
    register(FullRank)
    register(Drifting)
    register(Undeclared)
'''

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def broken_dir(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "broken_selectors.py").write_text(textwrap.dedent(BROKEN_SELECTORS))
    return folder


def _rows(stdout: str, check: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(check + " ")]


def test_builtin_selector_passes(cli):
    result = cli("test-plugin", "uniform")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uniform (selector): conforms" in result.stdout
    for check in ("loads", "parameters", "runs", "budget", "deterministic"):
        assert _rows(result.stdout, check) and all(" pass " in row for row in _rows(result.stdout, check)), check
    # every kind uniform claims is exercised on a tiny problem a task offers
    for kind in ("adaptation", "compression", "recovery"):
        assert any(row.split()[1] == kind for row in _rows(result.stdout, "runs")), kind


def test_builtin_factorization_passes(cli):
    result = cli("test-plugin", "svd")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "svd (factorization): conforms" in result.stdout
    runs = _rows(result.stdout, "runs")
    assert {row.split()[1] for row in runs} == {"compression", "training"}
    assert all(" pass " in row for row in runs)


def test_selector_ignoring_its_budget_fails_the_budget_check(cli, broken_dir):
    result = cli("test-plugin", "full-rank", "--plugins-dir", broken_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    budget = _rows(result.stdout, "budget")
    assert budget and all("FAIL" in row and "param_ratio" in row and "> budget 0.8" in row for row in budget)
    assert all(" pass " in row for row in _rows(result.stdout, "runs"))  # it runs; it just ignores the budget
    assert "full-rank (selector): FAILED budget" in result.stdout


def test_selector_with_hidden_state_fails_the_determinism_check(cli, broken_dir):
    result = cli("test-plugin", "drifting", "--plugins-dir", broken_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _rows(result.stdout, "deterministic")
    assert rows and all("FAIL" in row for row in rows)
    assert "differ" in result.stdout and "ranks differ" in result.stdout
    assert all(" pass " in row for row in _rows(result.stdout, "budget"))
    assert "drifting (selector): FAILED deterministic" in result.stdout


def test_undeclared_parameters_fail_the_parameters_check(cli, broken_dir):
    result = cli("test-plugin", "undeclared", "--plugins-dir", broken_dir)
    assert result.returncode == 1
    (row, *_) = [r for r in _rows(result.stdout, "parameters") if "FAIL" in r]
    assert "`description` is not set" in result.stdout and "without a default: alpha" in result.stdout
    assert "fields without a description: alpha" in result.stdout  # a warning, beside the failure
    assert "not run" in result.stdout and "FAILED parameters (" in result.stdout  # nothing runs without defaults


def test_plugin_file_that_fails_to_import_fails_the_loads_check(cli):
    result = cli("test-plugin", "import_error", "--plugins-dir", BROKEN_PLUGINS)
    assert result.returncode == 1
    (row,) = _rows(result.stdout, "loads")
    assert "FAIL" in row and "import failed" in result.stdout and "a_module_that_does_not_exist" in result.stdout
    assert "FAILED loads" in result.stdout


def test_unknown_name_is_bad_input_with_close_matches(cli):
    result = cli("test-plugin", "unifrom")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "unknown plugin 'unifrom'" in result.stderr
    assert "did you mean: uniform?" in result.stderr
    wrong_kind = cli("test-plugin", "uniform", "--kind", "factorization")
    assert wrong_kind.returncode == 2 and "is not a factorization but a selector" in wrong_kind.stderr


def test_ambiguous_name_needs_a_kind(cli, tmp_path):
    (tmp_path / "twin.py").write_text(textwrap.dedent('''
        from rankbench import Factorization, Selector, hookimpl
        class S(Selector):
            name = "twin"
            def select(self, problem):
                return {}
        class F(Factorization):
            name = "twin"
        @hookimpl
        def rankbench_register_selectors(register):
            register(S)
        @hookimpl
        def rankbench_register_factorizations(register):
            register(F)
    '''))
    result = cli("test-plugin", "twin", "--plugins-dir", tmp_path)
    assert result.returncode == 2 and "--kind" in result.stderr


def test_task_runs_its_reference_and_every_kind(cli):
    result = cli("test-plugin", "matrix-recovery")
    assert result.returncode == 0, result.stdout + result.stderr
    scopes = {row.split()[1] + " " + row.split()[3] for row in _rows(result.stdout, "runs")}
    assert scopes == {
        "reference matrix-recovery[0]", "recovery matrix-recovery[0]",
        "reference matrix-recovery[1]", "recovery matrix-recovery[1]",
    }


UNTESTED_TASK = '''
from rankbench import hookimpl
from rankbench_plugins.tasks.matrix_recovery import MatrixRecovery


class Untested(MatrixRecovery):
    name = "untested-task"

    @classmethod
    def conformance_params(cls):
        return []


@hookimpl
def rankbench_register_tasks(register):
    register(Untested)
'''


def test_task_without_tiny_configurations_is_a_warning(cli, tmp_path):
    (tmp_path / "untested_task.py").write_text(textwrap.dedent(UNTESTED_TASK))
    result = cli("test-plugin", "untested-task", "--plugins-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = _rows(result.stdout, "configurations")
    assert "warn" in row and not _rows(result.stdout, "runs")


def test_executor_agrees_with_this_process(cli):
    result = cli("test-plugin", "inprocess")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(result.stdout, "agrees")
    assert len(rows) == 2 and all(" pass " in row for row in rows)


def test_tiny_cells_run_through_the_registered_in_process_executor():
    """The host has no executor of its own: tiny cells go through the executor plugin that declares ``in_process``;
    without one, no cell runs and the report says why."""
    import dataclasses

    from rankbench.conformance import FAIL, run_conformance
    from rankbench.plugins import load_plugins

    registry = load_plugins()
    info = registry.get("executor", "inprocess")
    batches = []

    class Counting(info.cls):
        def run(self, cells, runtime):
            batches.append(len(cells))
            yield from super().run(cells, runtime)

    registry.plugins["executor"]["inprocess"] = dataclasses.replace(info, cls=Counting)
    report = run_conformance("svd", registry=registry)
    assert report.passed, report.rows()
    assert len(batches) == 2 and all(batches)  # the run and its determinism re-run

    del registry.plugins["executor"]["inprocess"]
    report = run_conformance("svd", registry=registry)
    assert [(c.check, c.verdict) for c in report.checks if c.check == "runs"] == [("runs", FAIL)]
    assert "no registered executor runs cells in this process" in report.failed[0].detail


def test_conformance_configurations_of_builtin_tasks_are_valid():
    from rankbench.conformance import task_configs
    from rankbench.plugins import load_plugins

    configs, problems = task_configs(load_plugins())
    assert problems == []
    kinds = {(c.spec.name, c.main_kind) for c in configs}
    assert {("vit-classification", k) for k in ("compression", "adaptation", "training")} <= kinds
    assert {("pinn", k) for k in ("compression", "adaptation", "training")} <= kinds
    assert ("mlp-classification", "training") in kinds and ("matrix-recovery", "recovery") in kinds
    # the LLM task's tiny configuration: the locally built random Llama, so methods meet a real transformer
    assert ("llm-perplexity", "compression") in kinds
    (llm,) = [c for c in configs if c.spec.name == "llm-perplexity"]
    assert llm.spec.params["model"] == "tiny-random-llama" and llm.spec.params["seq_len"] <= 64


def test_budget_and_metric_rules():
    from rankbench.conformance import CellResult, budget_problem, compare, is_time_or_memory

    class FakeCell:
        def __init__(self, budget, kind):
            self.budget, self.budget_kind = budget, kind

    ok = CellResult("ok", "", 0.0, {"param_ratio": (0.5, "", None)}, {"a": (3, "3", 30), "b": (2, "2x4", 20)})
    assert budget_problem(FakeCell(0.5, "param_ratio"), ok) is None
    assert "> budget 0.4" in budget_problem(FakeCell(0.4, "param_ratio"), ok)
    assert "total rank 5" in budget_problem(FakeCell(4, "rank_total"), ok)
    assert "site b has rank 4 > cap 3" in budget_problem(FakeCell(3, "rank_cap"), ok)
    assert is_time_or_memory("time_select_s", "s") and is_time_or_memory("latency_ms", "ms")
    assert is_time_or_memory("seconds_to_tol", "s") and is_time_or_memory("peak_rss_mb", "MiB")
    assert not is_time_or_memory("accuracy", "")
    a = CellResult("ok", "", 1.0, {"acc": (0.9, "", True), "time_total_s": (1.0, "s", False)}, {})
    b = CellResult("ok", "", 2.0, {"acc": (0.9 + 1e-12, "", True), "time_total_s": (2.0, "s", False)}, {})
    keep = lambda n, u, h: not is_time_or_memory(n, u)  # noqa: E731
    assert compare(a, b, keep, ranks=True) == []
    c = CellResult("ok", "", 2.0, {"acc": (0.8, "", True)}, {})
    assert compare(a, c, keep, ranks=True) == ["acc 0.9 vs 0.8"]
