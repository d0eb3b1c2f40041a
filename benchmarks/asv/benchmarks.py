"""asv benchmarks: the recovery part of suites/smoke.yaml, timed, memory-profiled, and its quality numbers tracked.

Run with the project's venv: ``make asv`` (``asv run --python=same``). Quality numbers are ``track_`` benchmarks with
a unit; asv assumes lower is better for them, which holds for every number tracked here (errors).
"""

import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "suites" / "smoke.yaml"
TASK = "matrix-recovery"


def _recovery_smoke_suite(folder: Path) -> Path:
    """suites/smoke.yaml restricted to the matrix-recovery task, run in-process."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec["tasks"] = [t for t in spec["tasks"] if (t if isinstance(t, str) else next(iter(t))) == TASK]
    spec["name"] = "asv-recovery-smoke"
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(folder: Path) -> Path:
    from rankbench.cli import main

    out = folder / "out"
    main(["run", str(_recovery_smoke_suite(folder)), "--out", str(out), "--executor", "inprocess", "--device", "cpu"])
    return out


def _solvers() -> list[str]:
    spec = yaml.safe_load(SMOKE.read_text())
    return [f if isinstance(f, str) else next(iter(f)) for f in spec["factorizations"]]


class RecoverySmoke:
    timeout = 900
    number = 1
    repeat = 1
    warmup_time = 0

    def setup_cache(self):
        from rankbench.results import read_results

        with tempfile.TemporaryDirectory() as tmp:
            metrics = read_results(_run(Path(tmp)))
        ok = metrics[(metrics["status"] == "ok") & (metrics["task"] == TASK)]
        quality = ok[ok["metric"].isin(["rel_error", "rmse"])]
        return quality.groupby("factorization")["value"].median().to_dict()

    def time_recovery_smoke_suite(self, cache):
        with tempfile.TemporaryDirectory() as tmp:
            _run(Path(tmp))

    def peakmem_recovery_smoke_suite(self, cache):
        with tempfile.TemporaryDirectory() as tmp:
            _run(Path(tmp))

    def track_median_error(self, cache, solver):
        return cache.get(solver, float("nan"))

    track_median_error.params = _solvers()
    track_median_error.param_names = ["solver"]
    track_median_error.unit = "relative error (median over cells)"
