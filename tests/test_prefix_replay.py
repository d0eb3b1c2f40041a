"""Prefix replay (``rankbench.kinds.compression.PrefixReplay``): a calibration evaluation that compresses sites of
later blocks replays the earlier blocks' recorded dense outputs instead of running them. Known answer: the same
loss as running every block (the replay off), on tiny random models of every family the LLM task knows; the skipped
blocks really do not run; the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from rankbench.kinds.compression import CompressionStatistics, PrefixReplay
from rankbench.kinds.protocol import WORK_COUNTERS
from rankbench_plugins.factorizations.svd import SVD
from test_llm_families import EXPECTED, family_dirs, llm_cache, make_ctx, make_task, text_file, tokenizer

__all__ = ["family_dirs", "llm_cache", "text_file", "tokenizer"]  # fixtures used through pytest


def _stats(folder, text_file, llm_cache):
    task = make_task(model=str(folder), corpus=str(text_file), seq_len=32, max_eval_tokens=256, calib_samples=6,
                     calib_batch_size=2, lm_eval=False)
    ctx = make_ctx(llm_cache)
    return task, ctx, CompressionStatistics(task, ctx, SVD(SVD.Params()))


@pytest.mark.parametrize("family", list(EXPECTED))
def test_replayed_prefix_gives_the_full_evaluation_loss(family, family_dirs, text_file, llm_cache, monkeypatch):
    task, ctx, stats = _stats(family_dirs[family], text_file, llm_cache)
    model = task.model(ctx)
    blocks = task.site_blocks(model)
    sites = list(task.sites(ctx))
    last_block = [s for s in sites if s.startswith(blocks[-1] + ".")]
    cases = [{last_block[0]: 2}, {sites[0]: 3, last_block[-1]: 1}, {s: 2 for s in last_block}]
    with torch.no_grad():
        dense_before = [float(task.calibration_loss(model, b)) for b in task.calibration_batches(ctx)]
    replayed = [stats.calibration_loss(ranks, max_batches) for ranks in cases for max_batches in (None, 2)]
    counters = ctx.memo(WORK_COUNTERS, dict)
    assert counters["replayed_blocks"] == 4 * (len(blocks) - 1)  # cases 1 and 3, both batch counts
    monkeypatch.setattr(PrefixReplay, "MEMORY_LIMIT", -1)  # nothing may be recorded: every block runs
    other_ctx = make_ctx(llm_cache)
    plain = CompressionStatistics(task, other_ctx, stats.factorization)
    full = [plain.calibration_loss(ranks, max_batches) for ranks in cases for max_batches in (None, 2)]
    assert "replayed_blocks" not in other_ctx.memo(WORK_COUNTERS, dict)
    assert replayed == pytest.approx(full, rel=1e-12, abs=0)
    assert replayed[0] != pytest.approx(replayed[2], rel=1e-6)  # the cases differ: the comparison means something
    with torch.no_grad():
        assert [float(task.calibration_loss(model, b)) for b in task.calibration_batches(ctx)] == dense_before
    assert all(model.get_submodule(name).__class__.__name__ != "ReplayedBlock" for name in blocks)


def test_skipped_blocks_do_not_run(family_dirs, text_file, llm_cache):
    task, ctx, stats = _stats(family_dirs["llama"], text_file, llm_cache)
    model = task.model(ctx)
    blocks = task.site_blocks(model)
    calls = []
    handles = [model.get_submodule(b).register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
               for i, b in enumerate(blocks)]
    try:
        stats.calibration_loss({f"{blocks[-1]}.mlp.down_proj": 4})  # records (every block runs), then evaluates
        calls.clear()
        stats.calibration_loss({f"{blocks[-1]}.mlp.up_proj": 4})
    finally:
        for h in handles:
            h.remove()
    batches = len(list(task.calibration_batches(ctx)))
    assert calls == [len(blocks) - 1] * batches  # only the last block ran, once per batch
