"""Streamed compression (``rankbench.kinds.compression``): calibration statistics and decompositions computed block by
block equal the whole-model pass, on tiny random models of every family the LLM task knows; shared inputs share one
Gram matrix; the disk cache holds the factors memory-mapped. Known answers: the whole-model pass (itself checked
against hand-computed XᵀX in ``test_compression_kind``) and the dense logits."""

from __future__ import annotations

import math

import pytest
import torch

from rankbench.kinds import run_cell
from rankbench.kinds.compression import InputStatistics, collect_statistics, streamed_input_statistics
from rankbench_plugins.factorizations.asvd import ASVD
from rankbench_plugins.factorizations.svd_llm import SVDLLM
from rankbench_plugins.selectors.uniform import UniformSelector
from test_llm_families import EXPECTED, family_dirs, llm_cache, make_ctx, make_task, metrics, text_file, tokenizer

__all__ = ["family_dirs", "llm_cache", "text_file", "tokenizer"]  # fixtures used through pytest


def task_for(folder, text_file, **extra):
    return make_task(model=str(folder), corpus=str(text_file), seq_len=32, max_eval_tokens=256, calib_samples=6,
                     calib_batch_size=2, lm_eval=False, **extra)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_streamed_statistics_equal_the_whole_pass(family, family_dirs, text_file, llm_cache):
    task = task_for(family_dirs[family], text_file)
    ctx = make_ctx(llm_cache)
    model, sites = task.model(ctx), task.sites(ctx)
    whole: dict = {}
    collect_statistics(task, ctx, model, {"gram", "input_abs_mean"}, whole)
    blocks = task.site_blocks(model)
    seen = set()
    for block, stats in streamed_input_statistics(task, ctx, model, blocks, sites, {"gram", "input_abs_mean"}):
        assert all(name.startswith(block + ".") for name in stats)
        for name, s in stats.items():
            torch.testing.assert_close(s.gram, whole[name].gram, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(s.input_abs_mean, whole[name].input_abs_mean, rtol=1e-9, atol=1e-12)
            assert s.tokens == whole[name].tokens == 6 * 32
            seen.add(name)
    assert seen == set(sites)
    # the model is left as it was: a second whole pass gives the same numbers
    again: dict = {}
    collect_statistics(task, ctx, model, {"gram"}, again)
    for name in sites:
        torch.testing.assert_close(again[name].gram, whole[name].gram, rtol=0, atol=0)


def test_sites_fed_the_same_input_share_one_gram(family_dirs, text_file, llm_cache):
    task = task_for(family_dirs["llama"], text_file)
    ctx = make_ctx(llm_cache)
    model, sites = task.model(ctx), task.sites(ctx)
    store: dict = {}
    collect_statistics(task, ctx, model, {"gram"}, store)
    for i in range(2):
        layer = f"model.layers.{i}."
        q, k, v, o = (store[layer + f"self_attn.{p}_proj"].gram for p in "qkvo")
        gate, up, down = (store[layer + f"mlp.{p}_proj"].gram for p in ("gate", "up", "down"))
        assert q is k is v and gate is up
        assert len({id(q), id(o), id(gate), id(down)}) == 4
    # and the shared matrix is each site's own XᵀX: an independent hook on v_proj of layer 1
    captured = []
    site = "model.layers.1.self_attn.v_proj"
    handle = sites[site].register_forward_hook(lambda m, i, o: captured.append(i[0].detach().reshape(-1, 32).double()))
    with torch.no_grad():
        for batch in task.calibration_batches(ctx):
            task.calibration_loss(model, batch)
    handle.remove()
    x = torch.cat(captured)
    torch.testing.assert_close(store[site].gram, x.T @ x, rtol=1e-10, atol=1e-10)


def test_unshared_inputs_keep_separate_accumulators():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with InputStatistics({"a": a, "b": b}, {"gram"}) as inputs:
        a(x), b(y)
        a(y), b(x)
    store: dict = {}
    inputs.fill(store)
    expected = x.double().T @ x.double() + y.double().T @ y.double()
    torch.testing.assert_close(store["a"].gram, expected)
    torch.testing.assert_close(store["b"].gram, expected)
    assert store["a"].gram is not store["b"].gram


@pytest.mark.parametrize("factorization", [SVDLLM, ASVD])
def test_streamed_and_whole_compression_give_the_same_perplexity(factorization, family_dirs, text_file, llm_cache,
                                                                 monkeypatch):
    """svd-llm (Gram) and asvd (input means) at a 0.6 parameter budget: streamed cells and cells whose task offers
    no blocks compute the same decompositions and so the same perplexity; the streamed cell made one calibration
    pass of its own and no whole-model statistics."""
    folder = family_dirs["llama"]
    streamed_ctx = make_ctx(llm_cache)
    streamed_ctx.budget, streamed_ctx.budget_kind = 0.6, "param_ratio"
    streamed_task = task_for(folder, text_file)
    run_cell(streamed_task, streamed_ctx, UniformSelector(), factorization())
    slot = streamed_task.calibration_memo(streamed_ctx)
    assert not slot["done"] and slot["statistics"] == {}  # nothing held for every site at once

    whole_task = task_for(folder, text_file)
    monkeypatch.setattr(type(whole_task), "site_blocks", lambda self, model: None)
    whole_ctx = make_ctx(llm_cache)
    whole_ctx.budget, whole_ctx.budget_kind = 0.6, "param_ratio"
    run_cell(whole_task, whole_ctx, UniformSelector(), factorization())
    a, b = metrics(streamed_ctx), metrics(whole_ctx)
    assert math.isfinite(a["ppl_token"])
    assert a["ppl_token"] == pytest.approx(b["ppl_token"], rel=1e-6)
    assert a["param_ratio"] == b["param_ratio"]
    assert a["work_calibration_passes"] == b["work_calibration_passes"] == 1


def test_disk_cached_factors_are_memory_mapped_and_equal(family_dirs, text_file, llm_cache, tmp_path, monkeypatch):
    """With the disk cache on, a streamed cell writes each decomposition as it goes and holds the factors
    memory-mapped; a fresh process reads them (verified) and gets the same perplexity."""
    monkeypatch.delenv("RANKBENCH_NO_DECOMPOSITION_CACHE", raising=False)
    folder = family_dirs["llama"]
    cache = tmp_path / "cache"
    cache.mkdir()
    first = make_ctx(llm_cache)
    first.cache_dir = cache
    first.budget, first.budget_kind = 0.6, "param_ratio"
    first_task = task_for(folder, text_file)
    run_cell(first_task, first, UniformSelector(), SVDLLM())
    files = sorted((cache / "decompositions").rglob("*.pt"))
    assert len(files) == 14 and all(f.with_name(f.name + ".sha256").is_file() for f in files)
    held = first_task.calibration_memo(first)["decompositions"]
    assert len(held) == 14
    for d in held.values():  # factors held from the file (CPU, not resident copies); the spectrum on the device
        assert d.left.device.type == "cpu" and not d.left.is_contiguous() and d.right.is_contiguous()
    second = make_ctx(llm_cache)
    second.cache_dir = cache
    second.budget, second.budget_kind = 0.6, "param_ratio"
    run_cell(task_for(folder, text_file), second, UniformSelector(), SVDLLM())
    assert metrics(second)["work_decompositions_from_disk"] == 14
    assert metrics(second).get("work_decompositions", 0) == 0
    assert metrics(second)["ppl_token"] == metrics(first)["ppl_token"]
