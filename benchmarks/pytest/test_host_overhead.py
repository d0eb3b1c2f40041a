"""pytest-benchmark: the host's own cost per cell, measured on a suite of cells that do nothing (benchmarks/plugins/
noop.py), in-process and with subprocess isolation. Per-cell overhead = (T(N=400) - T(N=100)) / 300 cells, so
interpreter start-up, plugin loading and worker start-up cancel out; reported in ``extra_info``."""

import time
from pathlib import Path

import pytest

from rankbench.cli import main

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def run_dry(tmp_path, cells: int, executor: str) -> float:
    seeds = list(range(cells // 2))  # one reference cell and one method cell per seed
    suite = tmp_path / f"dry{cells}.yaml"
    suite.write_text(f"name: dry\ntasks: [noop]\nselectors: [uniform]\nfactorizations: [noop]\nbudgets: [0.5]\nseeds: {seeds}\n")
    out = tmp_path / f"out-{executor}-{cells}-{time.monotonic_ns()}"
    start = time.perf_counter()
    assert main(["run", str(suite), "--out", str(out), "--plugins-dir", str(PLUGINS), "--executor", executor]) == 0
    return time.perf_counter() - start


@pytest.mark.parametrize("executor", ["inprocess", "subprocess"])
@pytest.mark.benchmark(group="host-overhead")
def test_overhead_per_trivial_cell(benchmark, tmp_path, executor):
    def measure():
        return (run_dry(tmp_path, 400, executor) - run_dry(tmp_path, 100, executor)) / 300

    per_cell = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info["seconds_per_cell"] = per_cell
