"""pytest-benchmark: perplexity throughput of the ``llm-perplexity`` task against lm-eval's HFLM in the same run.

* ``ppl-vs-hflm``: SmolLM2-135M (the task's built-in model, converted once and cached) on the first 2,048 tokens
  of the enwiki test text, seq_len 256, batch 4 windows:
  - ``test_ppl_token_loop``: the task's ``token_nll`` (protocol A, non-overlapping windows);
  - ``test_hflm_rolling_reference``: lm-eval's ``HFLM.loglikelihood_rolling`` on the same text decoded from the
    same tokens (rolling windows of max_length = seq_len), the reference.
  Both score the same number of tokens; the ratio of their medians is the throughput ratio.

Run: ``make benchmark``. Needs the SmolLM2 conversion (``make bench`` does it once).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rankbench.context import CellContext
from rankbench.runner import cache_root
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams, token_nll

SEQ, TOKENS, BATCH = 256, 2048, 4


@pytest.fixture(scope="module")
def loaded():
    task = LLMPerplexity(LLMPerplexityParams(seq_len=SEQ, max_eval_tokens=TOKENS, lm_eval=False))
    ctx = CellContext(cell_id="bench", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None, shared={},
                      cache_dir=Path(cache_root()) / "llm-perplexity")
    model = task.model(ctx)
    ids = task.test_ids(ctx)[:TOKENS]
    return model, ctx.shared["llm_loaded"].tokenizer, ids


@pytest.mark.slow
@pytest.mark.benchmark(group="ppl-vs-hflm")
def test_ppl_token_loop(benchmark, loaded):
    model, _, ids = loaded
    nll, tokens, _ = benchmark(token_nll, model, ids, SEQ, None, BATCH, "cpu")
    benchmark.extra_info["tokens"] = tokens
    assert tokens == (TOKENS // SEQ) * (SEQ - 1) and nll > 0


@pytest.mark.slow
@pytest.mark.benchmark(group="ppl-vs-hflm")
def test_hflm_rolling_reference(benchmark, loaded):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, ids = loaded
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=SEQ, batch_size=BATCH, device="cpu")
    text = tokenizer.decode(ids.tolist())
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    with torch.no_grad():
        (loglik,) = benchmark(lm.loglikelihood_rolling, [request], disable_tqdm=True)
    benchmark.extra_info["tokens"] = len(tokenizer(text)["input_ids"])
    assert loglik < 0
