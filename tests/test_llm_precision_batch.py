"""Task ``llm-perplexity``: ``dtype: auto`` (float32 on CPU, the checkpoint's half type on CUDA, a non-silent
fallback), evaluation under autocast for half weights on CUDA (loss in float32), half-precision models through the
compression protocol (statistics and decompositions from upcast weights, factors stored back in the weights' type),
and ``eval_batch_size: null`` (the batch chosen from free memory by the module docstring's formula).

There is no GPU here: the CUDA paths are exercised with monkeypatched ``torch.cuda`` functions (as
``tests/test_cuda_settings.py`` does) and, for autocast, a CPU autocast standing in for CUDA's."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rankbench.api import Selector
from rankbench.context import CellContext
from rankbench.kinds import run_cell
from rankbench.kinds.compression import LowRankLinear
from rankbench_plugins.tasks import _llm_assets as assets
from rankbench_plugins.tasks import llm_perplexity as llm
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams

SEQ = 32
TINY = assets.TINY_MODEL  # vocabulary 512, hidden 64, intermediate 128, 4 heads, SDPA attention
# window_memory_bytes of the tiny model at seq_len 32 (the module docstring's formula, by hand):
FP32_WINDOW = 32 * 512 * (4 + 0 + 4) + 32 * (4 * 64 + 3 * 128) * 4  # 131,072 + 81,920 = 212,992
BF16_WINDOW = 32 * 512 * (2 + 4 + 4) + 32 * (4 * 64 + 3 * 128) * 2  # 163,840 + 40,960 = 204,800
EAGER_FP32_WINDOW = FP32_WINDOW + 4 * 32 * 32 * (4 + 4)  # + 32,768 = 245,760


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llm-precision-cache")


@pytest.fixture(scope="module")
def tiny_folder(cache) -> Path:
    return assets.cached_tiny_model(cache)[0]


@pytest.fixture(scope="module")
def bf16_folder(tiny_folder, tmp_path_factory) -> Path:
    """The tiny model's folder with a config declaring bfloat16 weights (the weights file is float32: loading casts)."""
    folder = tmp_path_factory.mktemp("bf16-checkpoint") / "model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_ctx(cache_dir: Path, shared: dict | None = None, device: str = "cpu") -> CellContext:
    return CellContext(cell_id="test", seed=0, task_seed=0, device=device, budget=None, budget_kind=None,
                       shared={} if shared is None else shared, cache_dir=Path(cache_dir))


def make_task(**params) -> LLMPerplexity:
    base = {"model": TINY, "seq_len": SEQ, "max_eval_tokens": 10 * SEQ, "calib_samples": 4, "calib_batch_size": 2,
            "max_text_chars": 20000, "lm_eval": False}
    return LLMPerplexity(LLMPerplexityParams.model_validate({**base, **params}))


def metrics(ctx: CellContext) -> dict[str, float]:
    return {m["metric"]: m["value"] for m in ctx.metrics}


@contextlib.contextmanager
def fake_device_moves():
    """``Module.to`` ignores device moves (a fake CUDA load keeps the model on the CPU); dtype casts still apply."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


# ---------------------------------------------------------------------------------------------------------------------
# dtype: auto


def test_params_accept_auto_and_null_and_keep_the_defaults():
    p = LLMPerplexityParams()
    assert (p.dtype, p.eval_batch_size) == ("float32", 4)  # the smoke reference's task parameters are unchanged
    q = LLMPerplexityParams(dtype="auto", eval_batch_size=None)
    assert (q.dtype, q.eval_batch_size) == ("auto", None)
    for bad in ({"dtype": "half"}, {"eval_batch_size": 0}):
        with pytest.raises(ValueError):
            LLMPerplexityParams(**bad)


@pytest.mark.parametrize("declared, bf16_ok, device, want", [
    ("bfloat16", True, "cpu", "float32"),  # never half on the CPU, whatever the checkpoint
    ("float16", True, "cpu", "float32"),
    ("bfloat16", True, "cuda", "bfloat16"),
    ("bfloat16", False, "cuda", "float32"),  # no bf16 on this GPU: float32 (exact), said in the reason
    ("float16", False, "cuda", "float16"),
    ("float32", True, "cuda", "float32"),
    (None, True, "cuda:0", "float32"),
])
def test_resolve_dtype(monkeypatch, declared, bf16_ok, device, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    config = SimpleNamespace(dtype=None if declared is None else getattr(torch, declared))
    name, why = assets.resolve_dtype("auto", config, device)
    assert name == want and why.startswith("auto")
    assert ("fallback" in why) == (declared == "bfloat16" and not bf16_ok and device == "cuda")
    # explicit types are used as given, on every device; the config is only read for auto on CUDA
    assert assets.resolve_dtype("bfloat16", None, device) == ("bfloat16", "requested")
    assert assets.resolve_dtype("auto", lambda: pytest.fail("config read on the CPU"), "cpu")[0] == "float32"


def test_declared_dtype_reads_strings_types_and_the_old_field():
    assert assets.declared_dtype(SimpleNamespace(dtype="bfloat16")) == "bfloat16"
    assert assets.declared_dtype(SimpleNamespace(dtype=torch.float16)) == "float16"
    assert assets.declared_dtype(SimpleNamespace(torch_dtype="bfloat16")) == "bfloat16"  # transformers < 4.56
    assert assets.declared_dtype(SimpleNamespace()) is None


@pytest.mark.parametrize("bf16_ok, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_loads_a_bf16_checkpoint_by_the_gpu(bf16_folder, cache, monkeypatch, bf16_ok, want):
    """``load_causal_lm(folder, dtype='auto', device='cuda')`` reads the folder's config: bfloat16 weights where the
    (faked) GPU supports them, float32 with a fallback reason where not; on the CPU always float32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    with fake_device_moves():
        loaded = assets.load_causal_lm(str(bf16_folder), cache, "auto", "cuda")
    assert {p.dtype for p in loaded.model.parameters()} == {want}
    assert loaded.dtype == str(want).removeprefix("torch.")
    assert ("fallback" in loaded.dtype_choice) == (not bf16_ok)
    on_cpu = assets.load_causal_lm(str(bf16_folder), cache, "auto", "cpu")
    assert {p.dtype for p in on_cpu.model.parameters()} == {torch.float32}
    assert (on_cpu.dtype, on_cpu.dtype_choice) == ("float32", "auto: float32 on cpu")


def test_auto_on_cpu_is_float32_recorded_and_keyed_like_it(cache):
    """On the CPU ``auto`` gives exactly the float32 numbers and decomposition cache key; the notes say what ran."""
    shared: dict = {}
    auto, plain = make_task(dtype="auto"), make_task()
    ctx_auto, ctx_plain = make_ctx(cache), make_ctx(cache, shared)
    auto.evaluate(ctx_auto, auto.model(ctx_auto))
    plain.evaluate(ctx_plain, plain.model(ctx_plain))
    assert metrics(ctx_auto)["ppl_token"] == metrics(ctx_plain)["ppl_token"]
    assert ctx_auto.notes["dtype"] == ctx_plain.notes["dtype"] == "float32"
    assert ctx_auto.notes["dtype_choice"] == "auto: float32 on cpu" and ctx_plain.notes["dtype_choice"] == "requested"
    assert ctx_auto.notes["autocast"] == ctx_plain.notes["autocast"] == "off"
    assert auto.decomposition_cache_key(ctx_auto) == plain.decomposition_cache_key(ctx_plain)
    half = make_task(dtype="bfloat16")
    ctx_half = make_ctx(cache)
    assert half.decomposition_cache_key(ctx_half) != plain.decomposition_cache_key(ctx_plain)
    assert "eval_batch_size" not in metrics(ctx_plain)  # a given batch is a task parameter, not a metric


# ---------------------------------------------------------------------------------------------------------------------
# autocast


def test_autocast_only_for_half_weights_on_cuda():
    lin32, lin16 = nn.Linear(2, 2), nn.Linear(2, 2).to(torch.bfloat16)
    fp16 = nn.Linear(2, 2).to(torch.float16)
    assert llm.autocast_dtype(lin16, "cuda") == torch.bfloat16 and llm.autocast_dtype(fp16, "cuda:0") == torch.float16
    assert llm.autocast_dtype(lin16, "cpu") is None and llm.autocast_dtype(lin32, "cuda") is None
    assert llm.autocast_dtype(nn.Linear(2, 2).double(), "cuda") is None
    assert isinstance(llm.eval_autocast(lin16, "cpu"), contextlib.nullcontext)
    with warnings.catch_warnings():  # without CUDA torch warns and disables the context; it is still the right one
        warnings.simplefilter("ignore")
        ctx = llm.eval_autocast(lin16, "cuda")
    assert isinstance(ctx, torch.autocast) and (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)


def test_evaluation_forwards_run_under_eval_autocast_and_the_loss_in_float32(cache, monkeypatch):
    """With ``eval_autocast`` answering a (CPU) bfloat16 autocast, as it does for bf16 weights on CUDA: every
    ``ppl_token`` forward and lm-eval run inside it, the cross-entropy gets float32 logits outside it, and the
    perplexity of the bf16 model stays within bf16 round-off of the float32 model's."""
    task = make_task(dtype="bfloat16")
    ctx = make_ctx(cache)
    model = task.model(ctx)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opened: list = []

    def cpu_autocast(m, device):  # the real decision, as if on CUDA, opened on the CPU
        opened.append(device)
        dtype = llm.autocast_dtype(m, "cuda")
        return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)

    monkeypatch.setattr(llm, "eval_autocast", cpu_autocast)
    seen = {"forward": [], "loss": []}
    handle = model.register_forward_pre_hook(lambda *_: seen["forward"].append(torch.is_autocast_enabled("cpu")))
    real_ce = torch.nn.functional.cross_entropy

    def cross_entropy(logits, *args, **kwargs):
        seen["loss"].append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return real_ce(logits, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    try:
        nll, tokens, windows = llm.token_nll(model, task.test_ids(ctx), SEQ, 10, 4, "cpu")
    finally:
        handle.remove()
    assert windows == 10 and opened == ["cpu"] * 3 and seen["forward"] == [True] * 3
    assert seen["loss"] == [(torch.float32, False)] * 3
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_ce)
    reference = make_task()
    ref_ctx = make_ctx(cache)
    ref_nll, ref_tokens, _ = llm.token_nll(reference.model(ref_ctx), reference.test_ids(ref_ctx), SEQ, 10, 4, "cpu")
    assert tokens == ref_tokens
    assert math.exp(nll / tokens) == pytest.approx(math.exp(ref_nll / ref_tokens), rel=0.05)
    assert math.exp(nll / tokens) != math.exp(ref_nll / ref_tokens)  # it did run in bfloat16

    # lm-eval's forwards too (the call stands in for HFLM's): opened around it
    calls = []

    def fake_lm_eval(*args, **kwargs):
        calls.append(torch.is_autocast_enabled("cpu"))
        return {"word_perplexity": 1.0, "byte_perplexity": 1.0, "bits_per_byte": 0.0, "docs": 1.0, "words": 1.0,
                "bytes": 1.0}

    monkeypatch.setattr(assets, "lm_eval_perplexities", fake_lm_eval)
    lm_task = make_task(dtype="bfloat16", lm_eval=True)
    lm_ctx = make_ctx(cache)
    lm_task.evaluate(lm_ctx, lm_task.model(lm_ctx))
    assert calls == [True]


class HalfRank(Selector):
    name = "half-rank"

    def select(self, problem):
        return {site.name: max(1, site.max_rank // 2) for site in problem.sites}


def test_half_model_decomposes_upcast_weights_and_stores_factors_in_its_type(cache, monkeypatch):
    """A bfloat16 model through the compression protocol: SVD (precision float32) decomposes each site's weight
    upcast exactly to float32, svd-llm's Gram statistics are float64, and the swapped low-rank factors are bfloat16."""
    from rankbench_plugins.factorizations.svd import SVD
    from rankbench_plugins.factorizations.svd_llm import SVDLLM

    task = make_task(dtype="bfloat16")
    shared: dict = {}
    ctx = make_ctx(cache, shared)
    task.setup(ctx)
    name = "model.layers.1.mlp.down_proj"
    weight = task.sites(ctx)[name].weight
    assert weight.dtype == torch.bfloat16
    dec = task.decomposition(ctx, SVD(), name)
    assert dec.s.dtype == torch.float32
    torch.testing.assert_close(dec.s, torch.linalg.svdvals(weight.detach().float()), rtol=1e-5, atol=1e-6)
    stats = task.statistics(ctx, SVDLLM.needs)
    assert stats[name].gram.dtype == torch.float64
    swapped = {}
    evaluate = task.evaluate

    def spy(ctx_, model):
        swapped.update({n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)})
        return evaluate(ctx_, model)

    monkeypatch.setattr(task, "evaluate", spy)
    cell = make_ctx(cache, shared)
    run_cell(task, cell, HalfRank(), SVD())
    assert len(swapped) == 14
    assert {p.dtype for m in swapped.values() for p in m.parameters()} == {torch.bfloat16}
    assert math.isfinite(metrics(cell)["ppl_token"]) and cell.notes["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------------------------
# eval_batch_size: null


def test_window_estimate_follows_the_formula(cache):
    config = make_task().model(make_ctx(cache)).config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_attention_heads) == (
        512, 64, 128, 4)
    assert config._attn_implementation == "sdpa"
    assert llm.window_memory_bytes(config, SEQ, torch.float32) == FP32_WINDOW == 212_992
    assert llm.window_memory_bytes(config, SEQ, torch.bfloat16) == BF16_WINDOW == 204_800
    eager = SimpleNamespace(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            _attn_implementation="eager")
    assert llm.window_memory_bytes(eager, SEQ, torch.float32) == EAGER_FP32_WINDOW == 245_760
    # float64: logits and their float64 log-softmax; GPT-2-style config without intermediate_size: 4 H
    gpt2 = SimpleNamespace(vocab_size=100, hidden_size=8, n_inner=None, num_attention_heads=2,
                           _attn_implementation="sdpa")
    assert llm.window_memory_bytes(gpt2, 10, torch.float64) == 10 * 100 * 16 + 10 * (32 + 96) * 8


@pytest.mark.parametrize("free, want", [(1_000_000, 3), (5_000_000, 18), (0, 1), (10**12, 64)])
def test_auto_batch_from_free_cpu_memory(cache, monkeypatch, free, want):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=free))
    model = make_task().model(make_ctx(cache))
    assert llm.free_memory_bytes("cpu") == free
    assert want == max(1, min(64, math.floor(0.8 * free / FP32_WINDOW)))
    assert llm.auto_eval_batch_size(model, SEQ, "cpu") == want


def test_auto_batch_from_free_cuda_memory(cache, monkeypatch):
    """CUDA: mem_get_info's free bytes plus the allocator's reserved-but-unallocated bytes."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (3_000_000, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 500_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 300_000)
    assert llm.free_memory_bytes("cuda") == 3_200_000
    model = make_task().model(make_ctx(cache))
    assert llm.auto_eval_batch_size(model, SEQ, "cuda") == 12  # floor(0.8 x 3,200,000 / 212,992) = floor(12.02)
    bf16 = make_task(dtype="bfloat16").model(make_ctx(cache))
    assert llm.auto_eval_batch_size(bf16, SEQ, "cuda") == 12  # floor(2,560,000 / 204,800) = floor(12.5)
    assert llm.auto_eval_batch_size(bf16, SEQ, "cuda", fraction=0.5) == 7  # floor(1,600,000 / 204,800)


def test_perplexity_is_the_same_for_batch_1_4_and_auto(cache, monkeypatch):
    """ppl_token and lm-eval's word perplexity at batch 1, 4 and null (3 from the patched free memory: 10 windows in
    batches 3, 3, 3, 1) agree to 1e-6; only the automatic cell records its batch."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1_000_000))
    got = {}
    for batch in (1, 4, None):
        task = make_task(eval_batch_size=batch, lm_eval=True, max_eval_docs=1, max_eval_words=150)
        ctx = make_ctx(cache)
        task.evaluate(ctx, task.model(ctx))
        got[batch] = metrics(ctx)
    assert got[None]["eval_batch_size"] == 3 and "eval_batch_size" not in got[4]
    assert got[1]["eval_windows"] == got[None]["eval_windows"] == 10
    for name in ("ppl_token", "word_perplexity", "byte_perplexity"):
        assert got[4][name] == pytest.approx(got[1][name], rel=1e-6), name
        assert got[None][name] == pytest.approx(got[1][name], rel=1e-6), name
