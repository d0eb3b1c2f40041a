"""Suites: validation with one clear message and exit 2, cartesian expansion, skip rules, stable ids and seeds."""

import shutil

import pytest

from conftest import GOOD_PLUGINS
from rankbench.plugins import load_plugins
from rankbench.suite import SuiteError, expand, load_suite

VALID = """
name: toy
tasks: [{toy: {size: 20}}]
selectors: [uniform, oht]
factorizations: [toy-svd, gd]
budgets: [0.5, 0.25]
seeds: [0, 1]
"""


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("name: x\ntasks: [toy]\nselectors: [uniform]\n", "factorizations", "required key is missing"),
        ("name: 'bad name'\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\n", "name", "pattern"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudget: [1]\n", "budget", "unknown key"),
        ("name: x\ntasks: [nope]\nselectors: [uniform]\nfactorizations: [toy-svd]\n", "tasks[0]", "unknown task 'nope'"),
        ("name: x\ntasks: [toy]\nselectors: [uniform, nope]\nfactorizations: [toy-svd]\nbudgets: [0.5]\n", "selectors[1]", "expected one of:"),
        ("name: x\ntasks: [{toy: {size: big}}]\nselectors: [uniform]\nfactorizations: [toy-svd]\n", "tasks[0].toy.size", "valid integer"),
        ("name: x\ntasks: [{toy: {sise: 3}}]\nselectors: [uniform]\nfactorizations: [toy-svd]\n", "tasks[0].toy.sise", "unknown key"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: [1.5]\n", "budgets[0]", "(0, 1]"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\n", "budgets", "at least one budget"),
        ("name: x\ntasks: [{toy: {}, other: {}}]\nselectors: [uniform]\nfactorizations: [toy-svd]\n", "tasks[0]", "plugin name"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nseeds: [a]\n", "seeds[0]", "valid integer"),
        ("name: x\ntasks: [toy\n", "line", "expected valid YAML"),
        ("- just\n- a list\n", "", "expected a mapping"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: {param_ratio: [0.5, x]}\n", "budgets.param_ratio[1]", "valid number"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: {ratio: [0.5]}\n", "budgets.ratio", "'param_ratio'"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: {rank_cap: [5]}\n", "budgets.param_ratio", "at least one budget"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: [0.5]\nthreads: 0\n", "threads", "greater than or equal to 1"),
        ("name: x\nslices: [{tasks: [toy], selectors: [uniform]}]\n", "slices[0].factorizations", "required key is missing"),
        ("name: x\nslices: [{tasks: [toy], selectors: [nope], factorizations: [toy-svd]}]\nbudgets: [0.5]\n", "slices[0].selectors[0]", "unknown selector 'nope'"),
        ("name: x\nslices: [{tasks: [{toy: {}, b: {}}], selectors: [uniform], factorizations: [toy-svd]}]\n", "slices[0].tasks[0]", "plugin name"),
        ("name: x\nslices: [{tasks: [toy], selectors: [uniform], factorizations: [toy-svd], budgets: [2]}]\n", "slices[0].budgets[0]", "(0, 1]"),
        ("name: x\n", "tasks", "required key is missing"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: [0.5]\nexecutor: {subprocess: {bogus: 1}}\n", "executor.subprocess.bogus", "unknown key"),
        ("name: x\ntasks: [toy]\nselectors: [uniform]\nfactorizations: [toy-svd]\nbudgets: [0.5]\nexecutor: nope\n", "executor", "unknown executor 'nope'"),
    ],
)
def test_malformed_suites_exit_2_with_one_message(cli, write_suite, tmp_path, text, key, expected):
    path = write_suite(text)
    out = tmp_path / "out"
    for command in (["check", path], ["run", path, "--out", out]):
        result = cli(*command, "--plugins-dir", GOOD_PLUGINS)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert lines[0].startswith(f"error: {path}: {key}"), lines[0]
        assert expected in lines[0]
        assert not out.exists()


def test_bad_suite_in_a_fresh_process_exits_2(bench, write_suite, tmp_path):
    result = bench("run", write_suite("name: x\ntasks: [nope]\nselectors: [uniform]\nfactorizations: [svd]\n"), "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown task 'nope'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_cli_arguments_exit_2(cli, write_suite, tmp_path):
    path = write_suite(VALID)
    for args in (["--executor", "nope"], ["--plugins-dir", tmp_path / "missing"], ["--timeout", "-1"]):
        result = cli("run", path, "--out", tmp_path / "out", "--plugins-dir", GOOD_PLUGINS, *args)
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert cli("run", tmp_path / "nope.yaml").stderr.strip().endswith("expected a suite file (no such file)")
    assert not (tmp_path / "out").exists()


def _cells(path, plugins=GOOD_PLUGINS):
    return expand(load_suite(path), load_plugins(plugins), "cpu", 60.0)


def test_cartesian_expansion_with_skips_and_budget_free_selectors(write_suite):
    cells = _cells(write_suite(VALID))
    references = [c for c in cells if c.is_reference]
    assert len(references) == 2  # one per task configuration and seed
    assert all(c.factorization == "dense" and c.budget is None for c in references)
    methods = [c for c in cells if not c.is_reference]
    # uniform: 2 budgets, oht: budget-free -> once; x 2 factorizations x 2 seeds
    assert len(methods) == (2 + 1) * 2 * 2
    assert all(c.budget is None for c in methods if c.selector == "oht")
    skipped = [c for c in methods if c.skip_reason]
    assert {c.factorization for c in skipped} == {"gd"}
    assert all("does not handle compression problems" in c.skip_reason for c in skipped)
    assert len({c.cell_id for c in cells}) == len(cells)


def test_ids_are_stable_under_reordering_and_spelled_out_defaults(write_suite):
    a = _cells(write_suite(VALID, "a.yaml"))
    reordered = """
    name: toy
    seeds: [1, 0]
    budgets: [0.25, 0.5]
    factorizations: [gd, toy-svd]
    selectors: [{oht: {sigma: null}}, uniform]
    tasks: [{toy: {size: 20, work_s: 0.0}}]
    """
    b = _cells(write_suite(reordered, "b.yaml"))
    assert {c.cell_id for c in a} == {c.cell_id for c in b}
    assert {c.cell_id: c.cell_seed for c in a} == {c.cell_id: c.cell_seed for c in b}
    # one task configuration and suite seed -> one task seed shared by every method; seeds differ across seeds
    by_seed = {}
    for cell in a:
        by_seed.setdefault(cell.seed, set()).add(cell.task_seed)
    assert all(len(s) == 1 for s in by_seed.values()) and by_seed[0] != by_seed[1]


def test_ids_change_when_plugin_code_changes(write_suite, tmp_path):
    plugins = tmp_path / "plugins"
    shutil.copytree(GOOD_PLUGINS, plugins)
    path = write_suite(VALID)
    before = {c.config_key: c.cell_id for c in _cells(path, plugins)}
    source = plugins / "toy.py"
    source.write_text(source.read_text() + "\n# an edit\n")
    import rankbench.plugins as host

    host.file_hash.cache_clear()
    after = {c.config_key: c.cell_id for c in _cells(path, plugins)}
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert len(changed) == len(before)  # every cell involves the edited task


def test_check_prints_cells_per_task(cli, write_suite):
    result = cli("check", write_suite(VALID), "--plugins-dir", GOOD_PLUGINS)
    assert result.returncode == 0, result.stderr
    assert "14 cells" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("toy"))
    assert row.split() == ["toy", "2", "6", "6", "14"]


def test_suite_error_names_file_and_key(write_suite):
    with pytest.raises(SuiteError) as info:
        load_suite(write_suite("name: x\ntasks: []\nselectors: [a]\nfactorizations: [b]\n"))
    assert info.value.key == "tasks"


def test_budgets_per_budget_kind_serve_mixed_suites(write_suite):
    cells = _cells(write_suite("""
    name: mixed
    tasks: [{toy: {size: 12}}, {matrix-recovery: {shape: [30, 20], rank: 2}}]
    selectors: [uniform]
    factorizations: [toy-svd, altmin]
    budgets: {param_ratio: [0.5, 0.25], rank_cap: [3]}
    """))
    run = [c for c in cells if not c.is_reference and not c.skip_reason]
    assert sorted((c.task, c.budget_kind, c.budget) for c in run) == [
        ("matrix-recovery", "rank_cap", 3.0), ("toy", "param_ratio", 0.25), ("toy", "param_ratio", 0.5)
    ]


def test_slices_run_the_union_of_their_products(write_suite):
    """``slices``: each is its own product (budgets and seeds default to the suite's); the same cell listed twice is
    one cell; a top-level product and slices combine."""
    registry = load_plugins(GOOD_PLUGINS)
    sliced = load_suite(write_suite("""
name: sliced
budgets: [0.5]
slices:
  - {tasks: [{toy: {size: 20}}], selectors: [uniform], factorizations: [toy-svd]}
  - {tasks: [{toy: {size: 20}}], selectors: [uniform], factorizations: [toy-svd], budgets: [0.25], seeds: [0, 1]}
"""))
    cells = expand(sliced, registry, "cpu", None)
    run = sorted((c.selector, c.budget if c.budget is not None else -1, c.seed) for c in cells)
    # one reference per seed, uniform at 0.5 (seed 0) and at 0.25 (seeds 0, 1)
    assert run == [("none", -1, 0), ("none", -1, 1), ("uniform", 0.25, 0), ("uniform", 0.25, 1), ("uniform", 0.5, 0)]
    flat = load_suite(write_suite(VALID))
    mixed = load_suite(write_suite(VALID + "slices:\n  - {tasks: [{toy: {size: 20}}], selectors: [uniform], "
                                          "factorizations: [toy-svd], budgets: [0.1]}\n"))
    flat_ids = {c.cell_id for c in expand(flat, registry, "cpu", None)}
    mixed_cells = expand(mixed, registry, "cpu", None)
    assert flat_ids < {c.cell_id for c in mixed_cells}
    assert sorted(c.budget for c in mixed_cells if c.cell_id not in flat_ids) == [0.1, 0.1]  # seeds 0, 1


FIELDS_SET_PLUGIN = '''
from pydantic import model_validator
from rankbench import Factorization, PluginParams, hookimpl


class Picky(Factorization):
    name = "picky"

    class Params(PluginParams):
        mode: str = "a"
        strength: float = 1.0

        @model_validator(mode="after")
        def _strength_only_in_mode_a(self):
            if self.mode != "a" and "strength" in self.model_fields_set:
                raise ValueError("strength is for mode a")
            return self

    def approximate(self, w, rank):
        return w


@hookimpl
def rankbench_register_factorizations(register):
    register(Picky)
'''


def test_parameters_the_running_process_would_reject_are_refused_by_check(cli, write_suite, tmp_path):
    """A cell carries every resolved parameter to the process that runs it, which validates them again: a validator
    that looks at which fields were spelled out passes the suite and fails every cell. bench check catches it."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "picky.py").write_text(FIELDS_SET_PLUGIN)
    (plugins / "toy.py").write_text((GOOD_PLUGINS / "toy.py").read_text())
    suite = write_suite(VALID.replace("[toy-svd, gd]", "[{picky: {mode: b}}]"))
    result = cli("check", suite, "--plugins-dir", plugins)
    assert result.returncode == 2
    assert "factorizations[0].picky" in result.stderr and "rejects its own resolved parameters" in result.stderr
