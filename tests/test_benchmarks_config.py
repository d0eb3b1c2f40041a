"""The asv configuration and the nightly benchmarks (benchmarks/asv/): asv discovers them in the project's venv, and
the helpers that turn a results folder into asv's numbers behave (labels, lower-is-better quality, medians over
seeds, failed cells, the recorded-time clock, the discovered-parameters guard). No benchmark and no suite is run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _load_nightlylib():
    spec = importlib.util.spec_from_file_location("nightlylib", ROOT / "benchmarks" / "asv" / "nightlylib.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


lib = _load_nightlylib()


def test_asv_discovers_the_benchmarks():
    asv = Path(sys.executable).with_name("asv")
    result = subprocess.run([str(asv), "check", "--python=same"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout + result.stderr


def test_asv_conf_is_plain_json_with_per_kind_regression_thresholds():
    conf = json.loads((ROOT / "asv.conf.json").read_text())  # the parameter guard reads it with json.loads
    assert conf["benchmark_dir"] == "benchmarks/asv"
    assert conf["environment_type"] == "virtualenv" and "overlay_env.py install" in conf["install_command"][0]
    thresholds = conf["regressions_thresholds"]
    assert ".*" not in thresholds  # asv takes the largest matching threshold: a catch-all would override quality's
    quality = [t for pattern, t in thresholds.items() if "Quality" in pattern]
    assert quality == [0.02]


# ---------------------------------------------------------------------------------------------------------- labels


def _cell(task="t", task_params=None, selector="s", selector_params=None, factorization="f",
          factorization_params=None, budget=0.5, budget_kind="param_ratio", seed=0):
    from rankbench.cells import Cell

    return Cell(suite="fake", task=task, task_params=task_params or {}, selector=selector,
                selector_params=selector_params or {}, factorization=factorization,
                factorization_params=factorization_params or {}, budget=budget,
                budget_kind=budget_kind if budget is not None else None, seed=seed, device="cpu",
                versions={}, timeout=None)


def test_distinguishing_keys_are_the_fewest_that_separate_configurations():
    configs = [
        {"problem": "completion", "shape": [100, 80], "rank": 3},
        {"problem": "sensing", "shape": [20, 20], "rank": 2},
        {"problem": "robust", "shape": [40, 40], "rank": 2},
    ]
    assert lib.distinguishing_keys(configs) == ["problem"]
    assert lib.distinguishing_keys(configs[:1]) == []
    assert lib.distinguishing_keys([{"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 2, "b": 1}]) == ["a", "b"]


def test_labels_are_short_stable_and_unique():
    mr = {"problem": "completion", "rank": 3}
    cells = [
        _cell("mr", mr, "none", {}, "dense", {}, None),
        _cell("mr", mr, "ard", {"max_rank": 10, "tol": 1e-5}, "gd", {"step": 0.5}, None),
        _cell("mr", {"problem": "sensing", "rank": 3}, "uniform", {}, "gd", {"step": 0.5}, 5, "rank_cap"),
        _cell("vit", {"dim": 32}, "sensitivity", {"ratios": [0.3, 0.6, 0.9]}, "svd", {}, 0.5, "param_ratio"),
        _cell("vit", {"dim": 32}, "sensitivity", {"ratios": [0.3, 0.6, 0.9]}, "svd", {}, 0.5, seed=1),
    ]
    defaults = {("selector", "ard"): {"max_rank": None, "tol": 1e-5}, ("factorization", "gd"): {"step": 0.5},
                ("selector", "uniform"): {}, ("selector", "sensitivity"): {"ratios": [0.5]},
                ("factorization", "svd"): {}}
    labels = lib.make_labels(cells, defaults)
    assert sorted(labels.values()) == sorted([
        "mr[problem=completion]/none/dense",
        "mr[problem=completion]/ard[max_rank=10]/gd",
        "mr[problem=sensing]/uniform/gd/rank_cap=5",
        "vit/sensitivity[ratios=[0.3,0.6,0.9]]/svd/param_ratio=0.5",  # seeds collapse into one configuration
    ])
    # two configurations the short form cannot tell apart keep distinct, stable labels
    clash = lib.make_labels([_cell(selector_params={"x": 1}), _cell(selector_params={"x": 2})], {})
    assert len(set(clash.values())) == 2 and all("#" not in v for v in clash.values())  # no defaults: all params
    clash = lib.make_labels([_cell(selector_params={"x": 1}), _cell(selector_params={"x": 2})],
                            {("selector", "s"): {"y": 0}})  # x unknown to the defaults: shown
    assert sorted(clash.values()) == ["t/s[x=1]/f/param_ratio=0.5", "t/s[x=2]/f/param_ratio=0.5"]
    clash = lib.make_labels([_cell(selector_params={"x": 1}), _cell(selector_params={"x": "1"})], {})
    assert len(set(clash.values())) == 2 and all(v.startswith("t/s[x=1]/f/param_ratio=0.5#") for v in clash.values())


def test_higher_is_better_metrics_become_honest_lower_is_better_numbers():
    assert lib.tracked_quality("accuracy") == "top1_error"
    assert lib.AS_LOWER_IS_BETTER["accuracy"][1](0.9) == pytest.approx(0.1)
    for name in ("rel_error", "ppl_token", "l2re"):
        assert lib.tracked_quality(name) == name
    assert "1 - accuracy" in lib.quality_unit("top1_error")


# ------------------------------------------------------------------------------------------------- derivation


def _write(out, cell, status="ok", metrics=(), wall=1.0, primary="accuracy", reason=""):
    from rankbench.api import CellRecord
    from rankbench.results import write_cell

    record = CellRecord(cell_id=cell.cell_id, status=status, reason=reason, metrics=list(metrics),
                        started_at=f"2026-01-01T00:00:0{cell.seed}", wall_s=wall, primary_metric=primary)
    write_cell(out, cell, record, {"git_sha": "x", "device": "cpu"}, primary)


def _acc(value, rss):
    return [{"metric": "accuracy", "value": value, "unit": "", "higher_is_better": True},
            {"metric": "peak_rss_mb", "value": rss, "unit": "MiB", "higher_is_better": False}]


def test_summarize_takes_medians_over_seeds_and_reports_failed_cells(tmp_path):
    good = [_cell(seed=s) for s in (0, 1, 2)]
    bad = [_cell(selector="b", seed=s) for s in (0, 1)]
    for cell, acc, wall in zip(good, (0.9, 0.8, 0.7), (1.0, 3.0, 2.0)):
        _write(tmp_path, cell, metrics=_acc(acc, 100 * wall), wall=wall)
    _write(tmp_path, bad[0], metrics=_acc(0.5, 50))
    _write(tmp_path, bad[1], status="timeout", reason="cell exceeded its limit of 600 s")
    labels = lib.make_labels(good + bad, {})
    configs = {label: lib.Config(label, key, "t", "accuracy", "top1_error") for key, label in labels.items()}
    cache = lib.summarize(tmp_path, configs)
    good_label, bad_label = labels[lib.cell_key(good[0])], labels[lib.cell_key(bad[0])]

    assert lib.lookup(cache, good_label, "quality") == pytest.approx(0.2)  # 1 - median(0.9, 0.8, 0.7)
    assert lib.lookup(cache, good_label, "wall_s") == pytest.approx(2.0)
    assert lib.lookup(cache, good_label, "peak_rss_mb") == pytest.approx(200.0)
    with pytest.raises(lib.Unavailable):
        lib.lookup(cache, good_label, "peak_cuda_mb")  # a CPU run records no CUDA peak: asv shows n/a
    with pytest.raises(RuntimeError, match="1 of 2 cells not ok: seed 1: timeout: cell exceeded"):
        lib.lookup(cache, bad_label, "quality")
    with pytest.raises(RuntimeError, match="no finished cell"):
        lib.lookup(cache, "t/other/f", "quality")


def test_summarize_refuses_a_higher_is_better_metric_it_would_track_upside_down(tmp_path):
    cell = _cell()
    _write(tmp_path, cell, metrics=[{"metric": "f1", "value": 0.9, "unit": "", "higher_is_better": True}],
           primary="f1")
    (key, label), = lib.make_labels([cell], {}).items()
    cache = lib.summarize(tmp_path, {label: lib.Config(label, key, "t", "f1", lib.tracked_quality("f1"))})
    with pytest.raises(RuntimeError, match="f1 is higher-is-better: add it to AS_LOWER_IS_BETTER"):
        lib.lookup(cache, label, "quality")


# ------------------------------------------------------------------------------------------------- asv plumbing


def test_recorded_clock_makes_asv_time_benchmarks_report_the_recorded_seconds():
    from asv_runner.benchmarks.time import TimeBenchmark

    clock = lib.RecordedClock()

    class Holder:
        timer = clock
        number = 1
        repeat = 1
        rounds = 1
        warmup_time = 0

        def time_cell(self):
            clock.advance(12.5)

    holder = Holder()
    benchmark = TimeBenchmark("x.Holder.time_cell", holder.time_cell, [holder.time_cell, holder])
    benchmark.set_cache(None)
    result = benchmark.run()
    assert result == {"samples": [12.5], "number": 1}


def test_the_parameter_guard_fails_when_asv_discovered_other_labels(tmp_path, monkeypatch):
    (tmp_path / "asv.conf.json").write_text(json.dumps({"results_dir": "res"}))
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "benchmarks.json").write_text(json.dumps({"nightly.A.track_x": {"params": [["'a'", "'b'"]]}}))
    monkeypatch.setenv("ASV_CONF_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "run_server"])
    lib.check_discovered_params({"nightly.A.track_x": [["a", "b"]], "nightly.B.track_y": [["c"]]})  # same: fine
    with pytest.raises(RuntimeError, match="one commit at a time"):
        lib.check_discovered_params({"nightly.A.track_x": [["a", "c", "b"]]})
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "discover"])
    lib.check_discovered_params({"nightly.A.track_x": [["a", "c", "b"]]})  # discovery itself is never refused


def test_a_nightly_run_is_stored_under_its_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("ASV_COMMIT", raising=False)
    monkeypatch.setenv(lib.RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv(lib.COMMIT_ENV, "abc123")
    assert lib.results_folder(ROOT) == tmp_path / "abc123"
    monkeypatch.delenv(lib.COMMIT_ENV)
    monkeypatch.setenv("ASV_COMMIT", "def456")  # what asv sets in its per-commit environments
    assert lib.results_folder(ROOT) == tmp_path / "def456"


def test_the_suite_runs_as_one_bench_run_per_slice_with_the_same_cells(tmp_path):
    from rankbench.plugins import load_plugins
    from rankbench.suite import expand, load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: two-slices\nseeds: [0, 1]\ntimeout: 60\nslices:\n"
        "  - {tasks: [{matrix-recovery: {problem: completion, shape: [20, 10], rank: 2}}], selectors: [oht],"
        " factorizations: [gd]}\n"
        "  - {tasks: [{matrix-recovery: {problem: sensing, shape: [8, 8], rank: 2}}], selectors: [uniform],"
        " factorizations: [gd], budgets: {rank_cap: [3]}, seeds: [0]}\n"
    )
    parts = lib.split_suite(suite, tmp_path / "parts")
    assert len(parts) == 2
    registry = load_plugins()

    def ids(path):
        return {c.cell_id for c in expand(load_suite(path), registry, "cpu", 60)}

    assert ids(parts[0]) | ids(parts[1]) == ids(suite)
    assert lib.split_suite(parts[0], tmp_path / "again") == [parts[0]]  # one product: run as it is
