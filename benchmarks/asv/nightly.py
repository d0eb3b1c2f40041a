"""asv benchmarks of the nightly slice (``suites/nightly.yaml``): run once per commit, tracked per configuration.

``setup_cache`` runs the whole suite once per commit (``bench run SUITE --out .asv/nightly/<commit>/``, resumable,
kept for ``bench compare``) and every benchmark below only looks its number up in that run, so the ~20 minutes are
paid once, not once per benchmark type. Parameters are the configurations (task, selector, factorization, budget)
that run -- the suite is expanded at import, without running anything, skipped pairs left out -- one label each:
``task[params-short]/selector/factorization/budget_kind=value`` (see ``nightlylib.make_labels``).

* ``Quality.track_<name>``: the task's primary metric, median over seeds, made lower-is-better where it is not
  (asv assumes lower is better): ``rel_error``, ``ppl_token``, ``l2re`` as recorded; ``top1_error = 1 - accuracy``.
  One function per tracked name, each with its unit.
* ``CellTime.time_cell``: the cell's wall time as ``bench run`` recorded it (``wall_s``: set-up, method and
  evaluation in the worker), median over seeds -- reported through a ``timer`` that the body advances by the
  recorded seconds (``nightlylib.RecordedClock``; number = repeat = rounds = 1, no warm-up).
* ``CellMemory.track_peak_rss_mb``: the cell's peak resident memory as the worker recorded it (reset per cell).
* ``PeakMem.peakmem_cell``: asv's own ``peakmem_`` for one representative cell per task family, really executed
  in asv's process (asv's ``peakmem_`` measures the benchmark process, so it cannot be derived from the run).
* Where torch sees CUDA: ``CudaMemory.track_peak_cuda_mb`` per configuration (from the run) and
  ``GpuPeakMem.track_gpu_peakmem_cell`` (peak ``torch.cuda.max_memory_allocated`` of the representative cell run
  in asv's process) -- asv has no GPU-memory type of its own.

A configuration with a seed that did not finish ``ok`` fails its benchmarks with the cell's status and reason.
Environment: ``RANKBENCH_NIGHTLY_SUITE`` (another suite, e.g. a small one for a try-out), ``RANKBENCH_NIGHTLY_DIR``,
``RANKBENCH_NIGHTLY_COMMIT``, ``RANKBENCH_NIGHTLY_ARGS`` (extra ``bench run`` arguments), ``RANKBENCH_NIGHTLY_TIMEOUT``
(seconds for the whole run, default 4 h). See the README section "Nightly regression tracking".
"""

import os
from pathlib import Path

# Decide "is there a GPU" through NVML: asv forks every benchmark from a server process, and a CUDA driver
# initialised before the fork is unusable in the children.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from . import nightlylib as lib  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE = Path(os.environ.get("RANKBENCH_NIGHTLY_SUITE") or ROOT / "suites" / "nightly.yaml").resolve()
PLAN = lib.plan(SUITE)
VERSION = lib.version(SUITE, Path(__file__), Path(lib.__file__))
LABELS = PLAN.labels()
REPRESENTATIVES = list(PLAN.representatives)
CUDA = PLAN.device.startswith("cuda")
CLOCK = lib.RecordedClock()
EXPECTED = {}  # benchmark name -> params, for the check against what asv discovered


def _params(name, labels):
    EXPECTED[f"nightly.{name}"] = [labels]
    return [labels]


class _FromNightlyRun:
    """Shared by every class below that reads the run: asv runs one ``setup_cache`` per commit (its key is this
    function's place in this file) and hands its return value, the summary, to each benchmark."""

    version = VERSION
    param_names = ["configuration"]
    timeout = 120  # a look-up

    def setup_cache(self):
        folder = lib.run_suite(SUITE, lib.results_folder(ROOT))
        return lib.summarize(folder, PLAN.configs)

    setup_cache.timeout = float(os.environ.get("RANKBENCH_NIGHTLY_TIMEOUT", 4 * 3600))

    def setup(self, cache, label):
        lib.check_discovered_params(EXPECTED)

    @staticmethod
    def value(cache, label, field):
        try:
            return lib.lookup(cache, label, field)
        except lib.Unavailable:
            from asv_runner.benchmarks.mark import SkipNotImplemented

            raise SkipNotImplemented() from None


def _quality_benchmark(name):
    def track(self, cache, label):
        return self.value(cache, label, "quality")

    track.__name__ = track.__qualname__ = f"track_{name}"
    track.params = _params(f"Quality.track_{name}", PLAN.labels(name))
    track.unit = lib.quality_unit(name)
    return track


class Quality(_FromNightlyRun):
    """``track_<name>`` per tracked quality number (added below, one per primary metric in the suite)."""


for _name in PLAN.qualities():
    setattr(Quality, f"track_{_name}", _quality_benchmark(_name))


class CellTime(_FromNightlyRun):
    timer = CLOCK
    number = 1
    repeat = 1
    rounds = 1
    warmup_time = 0
    min_run_count = 1

    def time_cell(self, cache, label):
        CLOCK.advance(self.value(cache, label, "wall_s"))

    time_cell.params = _params("CellTime.time_cell", LABELS)


class CellMemory(_FromNightlyRun):
    def track_peak_rss_mb(self, cache, label):
        return self.value(cache, label, "peak_rss_mb")

    track_peak_rss_mb.params = _params("CellMemory.track_peak_rss_mb", LABELS)
    track_peak_rss_mb.unit = "MiB"


def _run_representative(label):
    from rankbench.runner import Runtime, execute_cell

    threads = lib.bench_threads()
    if threads:  # as in the nightly run: two OpenMP threads on busy cores spin in barriers for minutes
        import torch

        torch.set_num_threads(threads)
    cell = PLAN.representatives[label]
    record = execute_cell(cell, Runtime(registry=PLAN.registry, device=PLAN.device, timeout=cell.timeout))
    if record.status != "ok":
        raise RuntimeError(f"{label}: {record.status}: {record.reason}")


class _Representative:
    """One representative cell per task family (the first of the family that runs), executed in asv's process."""

    version = VERSION
    param_names = ["configuration"]
    timeout = 1800

    def setup(self, label):
        lib.check_discovered_params(EXPECTED)


class PeakMem(_Representative):
    def peakmem_cell(self, label):
        _run_representative(label)

    peakmem_cell.params = _params("PeakMem.peakmem_cell", REPRESENTATIVES)


if CUDA:

    class CudaMemory(_FromNightlyRun):
        def track_peak_cuda_mb(self, cache, label):
            return self.value(cache, label, "peak_cuda_mb")

        track_peak_cuda_mb.params = _params("CudaMemory.track_peak_cuda_mb", LABELS)
        track_peak_cuda_mb.unit = "MiB"

    class GpuPeakMem(_Representative):
        """The GPU counterpart of ``peakmem_``: peak CUDA memory allocated while the representative cell runs."""

        def track_gpu_peakmem_cell(self, label):
            import torch

            torch.cuda.reset_peak_memory_stats()
            _run_representative(label)
            return torch.cuda.max_memory_allocated()

        track_gpu_peakmem_cell.params = _params("GpuPeakMem.track_gpu_peakmem_cell", REPRESENTATIVES)
        track_gpu_peakmem_cell.unit = "bytes"
