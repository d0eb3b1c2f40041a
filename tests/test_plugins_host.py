"""The plugin host: entry points, --plugins-dir, restriction, failure isolation, third-party distributions."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import BROKEN_PLUGINS, GOOD_PLUGINS, ROOT
from rankbench.plugins import _Loader, load_plugins

BUILTIN = {
    "task": {"matrix-recovery", "llm-perplexity"},
    "selector": {"uniform", "energy", "effective-rank", "oht", "evbmf", "ard", "welore", "sensitivity", "adalora", "sublora"},
    "factorization": {"gd", "gd-sym", "scaledgd", "subgradient-l1", "altmin", "bcpf", "svd", "asvd", "fwsvd", "svd-llm"},
    "executor": {"inprocess", "subprocess"},
}


def test_builtins_load_through_entry_points():
    registry = load_plugins()
    assert registry.failures == []
    for kind, names in BUILTIN.items():
        assert names <= set(registry.names(kind)), kind
        for name in names:
            info = registry.get(kind, name)
            assert info.distribution == "rankbench"
            assert info.source.startswith(f"{name} = rankbench_plugins.")


def test_every_entry_point_in_pyproject_registers_its_named_plugin():
    """Each entry point of pyproject.toml (read from the file: the installed metadata may predate it) imports and
    registers exactly one plugin, under the entry point's name."""
    tomllib = pytest.importorskip("tomllib")
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["rankbench"]
    assert set(BUILTIN["executor"]) <= set(entry_points)
    for name, module_name in entry_points.items():
        loader = _Loader()
        loader.add_module(name, importlib.import_module(module_name), "rankbench", "", f"{name} = {module_name}")
        loader.collect()
        assert loader.registry.failures == [], name
        assert [info.name for info in loader.registry.all()] == [name], module_name


def test_broken_plugins_are_reported_and_skipped():
    registry = load_plugins(BROKEN_PLUGINS)
    failures = {f.plugin: f.error for f in registry.failures}
    assert "ModuleNotFoundError" in failures["import_error.py"]
    assert "hook without a spec" in failures["typo_hook"]
    assert "boom at registration" in failures["raising_hook"]
    assert "not a subclass of rankbench.Selector" in failures["not_a_plugin"]
    assert "HalfDone is abstract: it does not implement select" in failures["abstract_selector"]
    assert "half-done" not in registry.names("selector")
    # the good plugin in the same folder and every built-in still load
    assert "rank-one" in registry.names("selector")
    assert BUILTIN["selector"] <= set(registry.names("selector"))


def test_register_hooks_are_traced_and_still_isolated(monkeypatch, capsys):
    """RANKBENCH_TRACE_PLUGINS shows every register hook call (each plugin's, named by its `register` argument),
    and a plugin whose hook raises is still its own load failure."""
    monkeypatch.setenv("RANKBENCH_TRACE_PLUGINS", "1")
    registry = load_plugins(BROKEN_PLUGINS)
    trace = capsys.readouterr().err
    for hook in ("tasks", "selectors", "factorizations", "executors"):
        assert f"rankbench_register_{hook} [hook]" in trace
    assert "register: <register selector classes of plugin 'fine'>" in trace
    assert "register: <register selector classes of plugin 'raising_hook'>" in trace
    assert trace.count("register: <register executor classes of plugin 'subprocess'>") == 1
    assert "boom at registration" in {f.plugin: f.error for f in registry.failures}["raising_hook"]
    assert "rank-one" in registry.names("selector") and BUILTIN["selector"] <= set(registry.names("selector"))


def test_the_default_executor_is_the_one_that_declares_itself_default(tmp_path, monkeypatch, cli, write_suite):
    assert load_plugins().default_executor() == "subprocess"
    (tmp_path / "rival.py").write_text(textwrap.dedent('''
        from rankbench import Executor, hookimpl
        class Rival(Executor):
            name = "rival"
            default = True
            def run(self, cells, runtime):
                yield from (runtime.execute(cell) for cell in cells)
        @hookimpl
        def rankbench_register_executors(register):
            register(Rival)
    '''))
    with pytest.raises(LookupError, match=r"several executors declare themselves the default \(rival, subprocess\)"):
        load_plugins(tmp_path).default_executor()
    # no executor claims it (none loaded): `bench check` of a suite that names none says so, exit 2
    monkeypatch.setenv("RANKBENCH_LOAD_PLUGINS", "toy,uniform")
    suite = write_suite("""
    name: no-executor
    tasks: [{toy: {size: 12}}]
    selectors: [uniform]
    factorizations: [toy-svd]
    budgets: [0.5]
    """)
    result = cli("check", suite, "--plugins-dir", GOOD_PLUGINS)
    assert result.returncode == 2
    assert "no registered executor declares itself the default" in result.stderr and "--executor" in result.stderr


def test_loading_the_plugins_keeps_the_hugging_face_hub_offline_unless_the_user_says_otherwise():
    """The tasks that load Hugging Face models set HF_HUB_OFFLINE=1 when imported, unless it is set already."""
    code = "import os; from rankbench.plugins import load_plugins; load_plugins(); print(os.environ['HF_HUB_OFFLINE'])"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for user, expected in ((None, "1"), ("0", "0")):
        run_env = env if user is None else {**env, "HF_HUB_OFFLINE": user}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=300)
        assert out.stdout.strip() == expected, out.stderr


def test_plugins_command_lists_failures(bench):
    result = bench("plugins", "--plugins-dir", BROKEN_PLUGINS)
    assert result.returncode == 0, result.stderr
    assert "rank-one" in result.stdout and "(plugins-dir)" in result.stdout
    assert "failed to load" in result.stdout and "boom at registration" in result.stdout
    for column in ("name", "kind", "distribution", "dist version"):
        assert column in result.stdout


def test_environment_variable_restricts_plugins(monkeypatch):
    monkeypatch.setenv("RANKBENCH_LOAD_PLUGINS", "uniform,toy")
    registry = load_plugins(GOOD_PLUGINS)
    assert registry.names("selector") == ["uniform"]
    assert registry.names("task") == ["toy"]
    monkeypatch.setenv("RANKBENCH_LOAD_PLUGINS", "")
    registry = load_plugins(GOOD_PLUGINS)
    assert registry.all() == []


def test_duplicate_names_are_refused(tmp_path):
    (tmp_path / "dup.py").write_text(textwrap.dedent('''
        from rankbench import Selector, hookimpl
        class Uniform2(Selector):
            name = "uniform"
        @hookimpl
        def rankbench_register_selectors(register):
            register(Uniform2)
    '''))
    registry = load_plugins(tmp_path)
    assert any("already registered" in f.error for f in registry.failures)
    assert registry.get("selector", "uniform").distribution == "rankbench"


def test_third_party_distribution_is_discovered(tmp_path):
    """A package installed with its own entry point in group `rankbench` shows up in `bench plugins` and runs."""
    target = tmp_path / "site"
    example = ROOT / "examples" / "rankbench-stable-rank"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(example)],
        check=True, capture_output=True, timeout=300,
    )
    env = {"PYTHONPATH": str(target)}
    from conftest import run_bench

    listing = run_bench("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("stable-rank"))
    assert "selector" in row and "rankbench-stable-rank" in row and "0.1.0" in row
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""
        name: third-party
        tasks: [{matrix-recovery: {problem: completion, shape: [60, 50], rank: 3, max_iters: 50}}]
        selectors: [stable-rank]
        factorizations: [altmin]
        seeds: [0]
    """))
    run = run_bench("run", suite, "--out", tmp_path / "out", "--executor", "inprocess", env=env)
    assert run.returncode == 0, run.stderr


FATAL_PLUGINS = ROOT / "tests" / "plugin_files" / "fatal"


def test_plugins_that_segfault_exit_or_hang_at_import_become_load_failures(tmp_path, monkeypatch):
    """Imported first in a throwaway interpreter: the host lists them with the reason and loads the rest."""
    monkeypatch.setenv("RANKBENCH_PLUGIN_PROBES", str(tmp_path / "probes"))
    monkeypatch.setenv("RANKBENCH_PLUGIN_IMPORT_TIMEOUT", "3")
    registry = load_plugins(FATAL_PLUGINS)
    reasons = {f.plugin: f.error for f in registry.failures}
    assert "SIGSEGV" in reasons["segfault_at_import.py"]
    assert "exited with code 7" in reasons["exit_at_import.py"]
    assert "did not finish within 3 s" in reasons["hang_at_import.py"]
    assert "rank-one" in registry.plugins["selector"] and "uniform" in registry.plugins["selector"]
    # verdicts are cached per file content: a second load probes only the hanging file (timeouts are not cached)
    cached = sorted(p.name for p in (tmp_path / "probes").iterdir())
    assert len(cached) == 3
    started = []
    import rankbench.import_probe as probe

    real = probe._run_child
    monkeypatch.setattr(probe, "_run_child", lambda items, timeout: started.append(items) or real(items, timeout))
    again = load_plugins(FATAL_PLUGINS)
    assert {f.plugin for f in again.failures} == set(reasons)
    assert [[target.rsplit("/", 1)[-1] for _, target in items] for items in started] == [["hang_at_import.py"]]


def test_bench_plugins_survives_a_segfaulting_plugin_file(bench, tmp_path):
    result = bench("plugins", "--plugins-dir", FATAL_PLUGINS, env={"RANKBENCH_PLUGIN_IMPORT_TIMEOUT": "3",
                                                                  "RANKBENCH_PLUGIN_PROBES": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "segfault_at_import.py" in result.stdout and "SIGSEGV" in result.stdout and "rank-one" in result.stdout


def test_test_plugin_reports_a_crashing_selector_as_a_failed_check(bench):
    result = bench("test-plugin", "segfault", "--plugins-dir", ROOT / "tests" / "plugin_files" / "crashing")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SIGSEGV" in result.stdout and "FAIL" in result.stdout
