"""pytest-benchmark: a data-aware selector's per-site calibration evaluations (ASVD's sensitivity table: one site
truncated, the rest dense, the calibration loss) with the dense prefix replayed (``PrefixReplay``) against running
every block, in the same run.

SmolLM2-135M (the task's built-in model), llm.yaml's calibration (8 windows of 256 tokens, one per batch) and the
sensitivity selector's ``calib_batches: 1``; every 7th of the 210 sites (30 sites spread over the 30 blocks), each
truncated to rank 64 of its ``svd`` decomposition; one torch thread. ``replay-off`` (the reference) evaluates with
recording disabled (``MEMORY_LIMIT = -1``), ``replay-on`` as the selector does. The decompositions and the record are
computed before the timed rounds. ``extra_info["time_ratio_vs_replay_off"]``; the losses must be equal.

Run: ``make benchmark``. Needs the SmolLM2 conversion (``make bench`` does it once).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rankbench.context import CellContext
from rankbench.kinds.compression import CompressionStatistics, PrefixReplay
from rankbench.runner import cache_root
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams

_reference: dict[str, tuple[float, list[float]]] = {}


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    task = LLMPerplexity(LLMPerplexityParams(seq_len=256, calib_samples=8, calib_batch_size=1, lm_eval=False))
    ctx = CellContext(cell_id="bench", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None, shared={},
                      cache_dir=Path(cache_root()) / "llm-perplexity")
    sites = list(task.sites(ctx))[::7]
    stats = CompressionStatistics(task, ctx, SVD(SVD.Params()))
    for site in sites:
        stats.decomposition(site)
    yield stats, sites
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replay-off", "replay-on"])
def test_sensitivity_evaluations(benchmark, setup, mode, monkeypatch):
    benchmark.group = "sensitivity-evaluations"
    stats, sites = setup
    if mode == "replay-off":
        monkeypatch.setattr(PrefixReplay, "MEMORY_LIMIT", -1)
        stats.task.calibration_memo(stats.ctx).pop("prefix_replay", None)
    else:
        stats.task.calibration_memo(stats.ctx).pop("prefix_replay", None)
        stats.calibration_loss({sites[0]: 64}, 1)  # the record, outside the timed rounds

    def table():
        return [stats.calibration_loss({site: 64}, 1) for site in sites]

    losses = benchmark.pedantic(table, rounds=3, warmup_rounds=0)
    median = benchmark.stats.stats.median
    if mode == "replay-off":
        _reference["off"] = (median, losses)
    elif "off" in _reference:
        reference_median, reference_losses = _reference["off"]
        benchmark.extra_info["time_ratio_vs_replay_off"] = median / reference_median
        assert losses == pytest.approx(reference_losses, rel=1e-12)
