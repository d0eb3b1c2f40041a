"""pytest-benchmark: perplexity throughput of the ``llm-perplexity`` task against lm-eval's HFLM in the same run.

* ``ppl-vs-hflm``: SmolLM2-135M (the task's built-in model, converted once and cached) on the first 2,048 tokens
  of the enwiki test text, seq_len 256, batch 4 windows:
  - ``test_ppl_token_loop``: the task's ``token_nll`` (protocol A, non-overlapping windows);
  - ``test_hflm_rolling_reference``: lm-eval's ``HFLM.loglikelihood_rolling`` on the same text decoded from the
    same tokens (rolling windows of max_length = seq_len), the reference.
  Both score the same number of tokens; the ratio of their medians is the throughput ratio.
* ``ppl-vs-raw-b1`` / ``-b4`` / ``-b8``: the task's ``token_nll`` against the floor, a plain batched
  ``model(input_ids)`` over the same windows at the same batch size (no loss at all). The ratio of medians is the
  evaluation's overhead over the raw forward.

``RANKBENCH_BENCH_DEVICE=cuda`` runs every pair on the GPU (the model moved there; CUDA is synchronised after each
timed call, so asynchronous launches are not mistaken for finished work).

Run: ``make benchmark``. Needs the SmolLM2 conversion (``make bench`` does it once).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rankbench.context import CellContext
from rankbench.runner import cache_root
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams, token_nll

SEQ, TOKENS, BATCH = 256, 2048, 4
DEVICE = os.environ.get("RANKBENCH_BENCH_DEVICE", "cpu")


def synchronised(fn):
    """``fn`` followed by a CUDA synchronisation on a GPU (nothing on the CPU)."""
    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        return result
    return call


@pytest.fixture(scope="module")
def loaded():
    task = LLMPerplexity(LLMPerplexityParams(seq_len=SEQ, max_eval_tokens=TOKENS, lm_eval=False))
    ctx = CellContext(cell_id="bench", seed=0, task_seed=0, device=DEVICE, budget=None, budget_kind=None, shared={},
                      cache_dir=Path(cache_root()) / "llm-perplexity")
    model = task.model(ctx)
    ids = task.test_ids(ctx)[:TOKENS]
    return model, ctx.shared["llm_loaded"].tokenizer, ids


def raw_forwards(model, ids: torch.Tensor, batch: int) -> int:
    """The floor: the forwards ``token_nll`` runs, on the same windows and batches, and nothing else."""
    chunks = ids[: (ids.numel() // SEQ) * SEQ].view(-1, SEQ)
    with torch.no_grad():
        for start in range(0, chunks.shape[0], batch):
            model(input_ids=chunks[start : start + batch].to(DEVICE), use_cache=False)
    return chunks.shape[0]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_ppl_token_against_raw_forward(benchmark, loaded, batch):
    benchmark.group = f"ppl-vs-raw-b{batch}"
    model, _, ids = loaded
    nll, tokens, _ = benchmark(synchronised(token_nll), model, ids, SEQ, None, batch, DEVICE)
    assert tokens == (TOKENS // SEQ) * (SEQ - 1) and nll > 0


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_raw_forward_floor(benchmark, loaded, batch):
    benchmark.group = f"ppl-vs-raw-b{batch}"
    model, _, ids = loaded
    assert benchmark(synchronised(raw_forwards), model, ids, batch) == TOKENS // SEQ


@pytest.mark.slow
def test_fused_nll_equals_the_per_token_float64_sum(loaded):
    """On the real model (vocabulary 49,152): the fused float32 sum agrees with per-token float64 NLLs to 1e-6."""
    model, _, ids = loaded
    nll, tokens, _ = token_nll(model, ids, SEQ, None, 4, DEVICE)
    chunks = ids[: (ids.numel() // SEQ) * SEQ].view(-1, SEQ)
    with torch.no_grad():
        logits = model(input_ids=chunks.to(DEVICE), use_cache=False).logits.cpu()
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                  chunks[:, 1:].reshape(-1), reduction="sum")
    assert nll == pytest.approx(float(reference), rel=1e-6)


@pytest.mark.slow
@pytest.mark.benchmark(group="ppl-vs-hflm")
def test_ppl_token_loop(benchmark, loaded):
    model, _, ids = loaded
    nll, tokens, _ = benchmark(synchronised(token_nll), model, ids, SEQ, None, BATCH, DEVICE)
    benchmark.extra_info["tokens"] = tokens
    assert tokens == (TOKENS // SEQ) * (SEQ - 1) and nll > 0


@pytest.mark.slow
@pytest.mark.benchmark(group="ppl-vs-hflm")
def test_hflm_rolling_reference(benchmark, loaded):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, ids = loaded
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=SEQ, batch_size=BATCH, device=DEVICE)
    text = tokenizer.decode(ids.tolist())
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    with torch.no_grad():
        (loglik,) = benchmark(synchronised(lm.loglikelihood_rolling), [request], disable_tqdm=True)
    benchmark.extra_info["tokens"] = len(tokenizer(text)["input_ids"])
    assert loglik < 0
