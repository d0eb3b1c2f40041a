"""Task ``llm-perplexity``: parameters, corpora, model cache, sites, calibration, the two perplexity protocols, and the
compression protocol end to end -- on a tiny randomly initialised Llama saved (with a tiny byte-level BPE tokenizer)
to a folder and loaded through the same code path as any local Hugging Face model folder. Tests that load the real
SmolLM2-135M are marked slow."""

from __future__ import annotations

import hashlib
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankbench.api import CellFailure, Diverged, Selector
from rankbench.context import CellContext
from rankbench.kinds.compression import Decomposition, LowRankFactorization, LowRankLinear
from rankbench_plugins.tasks import _llm_assets as assets
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams
from rankbench.kinds import run_cell

SEQ = 64
SITE_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: one cache for the session (the enwiki extraction takes ~2 s), a tiny tokenizer + Llama folder, a text file


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llm-cache")


@pytest.fixture(scope="session")
def enwiki(llm_cache) -> assets.Corpus:
    return assets.enwiki_corpus(llm_cache)


tiny_tokenizer = assets.train_tiny_tokenizer  # byte-level BPE, vocabulary 512, SmolLM2's special tokens

TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": None, "max_position_embeddings": 2048}


def save_tiny_llama(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """``tiny_tokenizer`` and a 2-layer Llama (hidden 32, LlamaConfig's other defaults), saved to ``folder`` by the
    task's own builder (``assets.build_random_llama``)."""
    assets.build_random_llama(folder, TINY_SHAPE, tiny_tokenizer(texts), seed)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, enwiki) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), [d.page for d in enwiki.train[:8]])


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, enwiki) -> Path:
    """About 5k characters of real prose, with non-ASCII characters, as a user corpus."""
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    text = enwiki.train[1].page[:5000] + "\n\nCafé, naïve, Zürich – “quotes” and 日本語.\n"
    path.write_text(text, encoding="utf-8")
    return path


def make_ctx(cache_dir: Path, shared: dict | None = None, seed: int = 0, task_seed: int = 0) -> CellContext:
    return CellContext(
        cell_id="test", seed=seed, task_seed=task_seed, device="cpu", budget=None, budget_kind=None,
        shared={} if shared is None else shared, cache_dir=Path(cache_dir),
    )


def make_task(**params) -> LLMPerplexity:
    return LLMPerplexity(LLMPerplexityParams.model_validate(params))


def metrics(ctx: CellContext) -> dict[str, float]:
    return {m["metric"]: m["value"] for m in ctx.metrics}


# ---------------------------------------------------------------------------------------------------------------------
# Parameters


def test_params_defaults_and_validation(tmp_path, text_file):
    p = LLMPerplexityParams()
    assert (p.model, p.corpus, p.calib_corpus, p.seq_len, p.max_eval_tokens, p.calib_samples) == (
        "smollm2-135m", "enwiki", None, 512, 20000, 32)
    assert (p.lm_eval, p.max_eval_docs, p.dtype, p.sites) == (True, None, "float32", None)
    assert LLMPerplexityParams(corpus=str(text_file), calib_corpus=str(text_file)).corpus == str(text_file)
    assert LLMPerplexityParams(model="HuggingFaceTB/SmolLM2-135M").model  # a hub id is accepted (loaded later)

    def error(**kw) -> str:
        with pytest.raises(ValueError) as info:
            LLMPerplexityParams(**kw)
        return str(info.value)

    assert "corpus" in error(corpus=str(tmp_path / "missing.txt")) and "missing.txt" in error(
        corpus=str(tmp_path / "missing.txt"))
    assert "calib_corpus" in error(calib_corpus="wikitext")
    assert "does not exist" in error(model=str(tmp_path / "no-such-model"))
    assert "config.json" in error(model=str(tmp_path))  # a folder that is not a model folder
    assert "max_eval_tokens" in error(seq_len=512, max_eval_tokens=100)
    assert "extra" in error(sequence_length=12).lower()  # unknown keys are errors


# ---------------------------------------------------------------------------------------------------------------------
# Corpora


def test_enwiki_split_is_deterministic_disjoint_and_clean(enwiki, llm_cache):
    assert len(enwiki.train) == 85 and len(enwiki.test) == 21
    train_titles, test_titles = {d.title for d in enwiki.train}, {d.title for d in enwiki.test}
    assert not train_titles & test_titles and len(train_titles) == 85 and len(test_titles) == 21
    assert all(d.page.strip() for d in enwiki.train + enwiki.test)
    # the same split again, from the dump (not the cache), and from the cache
    docs = assets.extract_enwiki(assets.enwiki_dump_path())
    train, test = assets.split_by_title(docs)
    assert [d.title for d in test] == [d.title for d in enwiki.test]
    assert [d.page for d in train] == [d.page for d in enwiki.train]
    assert [d.title for d in assets.enwiki_corpus(llm_cache).test] == [d.title for d in enwiki.test]
    # page order is the dump's order within each split
    order = {d.title: i for i, d in enumerate(docs)}
    assert [order[d.title] for d in enwiki.test] == sorted(order[d.title] for d in enwiki.test)
    # markup is gone: no bold/italic quote runs, heading marks, list bullets or blank runs
    text = "\n\n".join(d.page for d in enwiki.test)
    assert "'''" not in text and "''" not in text
    assert not re.search(r"^\s*==", text, flags=re.M) and not re.search(r"^\s*\*", text, flags=re.M)
    assert "\n\n\n" not in text
    assert sum(len(d.page) for d in enwiki.test) > 500_000  # a WikiText-2-sized test text


def test_text_file_is_one_document(text_file, llm_cache):
    corpus = assets.load_corpus(str(text_file), llm_cache)
    assert len(corpus.test) == 1 and corpus.train == corpus.test
    assert corpus.test[0].page == text_file.read_text(encoding="utf-8")
    rows = assets.read_jsonl(corpus.test_jsonl)
    assert rows == corpus.test


# ---------------------------------------------------------------------------------------------------------------------
# Model loading and the one-time conversion cache


def test_conversion_cache_converts_once_and_is_complete(tmp_path, tiny_dir, monkeypatch):
    import shutil

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really a gguf file" * 100)
    calls = []

    def converter(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        for f in tiny_dir.iterdir():
            shutil.copy(f, out_dir / f.name)

    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(assets, "convert_gguf_checkpoint", converter)
    first = assets.load_causal_lm("smollm2-135m", tmp_path / "cache")
    second = assets.load_causal_lm("smollm2-135m", tmp_path / "cache")
    assert len(calls) == 1 and first.converted and not second.converted
    assert first.folder == second.folder and first.sha256 == assets.sha256_file(gguf)
    names = {p.name for p in first.folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", assets.MARKER} <= names
    assert not list(first.folder.parent.glob(".*.tmp-*"))  # no temporary folder left
    assert isinstance(second.model, nn.Module) and not second.model.training
    # a changed source file is a new key: converted again
    gguf.write_bytes(b"another file")
    assert assets.load_causal_lm("smollm2-135m", tmp_path / "cache").converted and len(calls) == 2


def test_killed_conversion_leaves_no_half_cache(tmp_path, tiny_dir):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x" * 1000)

    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half-way

    with pytest.raises(KeyboardInterrupt):
        assets.cached_conversion(gguf, tmp_path, "m", converter=broken)
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    # a stale temporary folder of a dead process is cleaned up by the next conversion
    stale = tmp_path / "models" / f".m-{assets.sha256_file(gguf)[:16]}-v{assets.CONVERSION_VERSION}.tmp-999999999-abc"
    stale.mkdir()
    folder, _, converted, _ = assets.cached_conversion(
        gguf, tmp_path, "m", converter=lambda s, out: (out / "config.json").write_text("{}"))
    assert converted and (folder / assets.MARKER).is_file() and not stale.exists()


def test_local_folder_checksum_and_hub_failure(tiny_dir, tmp_path, monkeypatch):
    loaded = assets.load_causal_lm(str(tiny_dir), tmp_path)
    assert loaded.sha256 == assets.sha256_file(tiny_dir / "model.safetensors")
    assert loaded.model.dtype == torch.float32
    assert assets.load_causal_lm(str(tiny_dir), tmp_path, dtype="float64").model.dtype == torch.float64
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt in tests
    task = make_task(model="no-such-org/no-such-model", lm_eval=False)
    with pytest.raises(CellFailure, match="hub is unreachable"):
        task.load_model(make_ctx(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Sites


def test_sites_of_a_tiny_llama(tiny_dir, llm_cache):
    task = make_task(model=str(tiny_dir), lm_eval=False)
    model = task.load_model(make_ctx(llm_cache))
    sites = task.target_sites(model)
    expected = [f"model.layers.{i}.{'self_attn' if k.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}"
                f".{k}" for i in range(2) for k in SITE_KINDS]
    assert list(sites) == expected
    assert all(type(m) is nn.Linear for m in sites.values())
    shapes = {name.rsplit(".", 1)[1]: tuple(m.weight.shape) for name, m in sites.items()}
    assert shapes == {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
                      "gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}
    assert not any("embed" in n or "lm_head" in n for n in sites)
    assert list(make_task(model=str(tiny_dir), sites=["mlp"]).target_sites(model)) == [
        n for n in expected if ".mlp." in n]
    # while sites are swapped for low-rank pairs, their inner Linears are not sites
    site = "model.layers.0.self_attn.q_proj"
    A, B = torch.randn(32, 4), torch.randn(4, 32)
    original = sites[site]
    model.model.layers[0].self_attn.q_proj = LowRankLinear(A, B, None)
    try:
        inner = task.target_sites(model)
        assert site not in inner and not any(n.startswith(site + ".") for n in inner) and len(inner) == 13
    finally:
        model.model.layers[0].self_attn.q_proj = original


# ---------------------------------------------------------------------------------------------------------------------
# ppl_token (protocol A)


def independent_ppl(model, tokenizer, text: str, seq_len: int, max_tokens: int) -> tuple[float, int, int]:
    ids = tokenizer(text)["input_ids"]
    n_windows = min(len(ids) // seq_len, max_tokens // seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            x = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
            logits = model(x).logits[0]
            total += float(F.cross_entropy(logits[:-1].double(), x[0, 1:], reduction="sum"))
            count += seq_len - 1
    return math.exp(total / count), n_windows, count


@pytest.mark.parametrize("max_eval_tokens", [5 * SEQ + 10, 100_000, None])  # None: every window
def test_ppl_token_equals_an_independent_computation(tiny_dir, text_file, llm_cache, max_eval_tokens):
    task = make_task(model=str(tiny_dir), corpus=str(text_file), seq_len=SEQ, max_eval_tokens=max_eval_tokens,
                     lm_eval=False, eval_batch_size=3)
    ctx = make_ctx(llm_cache)
    model = task.model(ctx)
    task.evaluate(ctx, model)
    got = metrics(ctx)
    tokenizer = ctx.shared["llm_loaded"].tokenizer
    ppl, windows, tokens = independent_ppl(model, tokenizer, text_file.read_text(encoding="utf-8"), SEQ,
                                           max_eval_tokens or 10**9)
    n_ids = len(tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"])
    assert windows == (5 if (max_eval_tokens or 10**9) < 1000 else n_ids // SEQ) and windows >= 5
    assert got["eval_windows"] == windows and got["eval_tokens"] == tokens and got["seq_len"] == SEQ
    assert got["ppl_token"] == pytest.approx(ppl, rel=1e-6)
    assert got["model_params"] == sum(p.numel() for p in model.parameters())
    assert ctx.notes["model_sha256"] == task.model_sha and len(task.model_sha) == 64
    assert ctx.notes["corpus_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert "word_perplexity" not in got


def test_ppl_token_joins_test_articles(tiny_dir, enwiki, llm_cache):
    task = make_task(model=str(tiny_dir), seq_len=SEQ, max_eval_tokens=4 * SEQ, lm_eval=False)
    ctx = make_ctx(llm_cache)
    task.evaluate(ctx, task.model(ctx))
    text = "\n\n".join(d.page for d in enwiki.test)
    ppl, windows, _ = independent_ppl(task.model(ctx), ctx.shared["llm_loaded"].tokenizer, text, SEQ, 4 * SEQ)
    assert windows == 4 and metrics(ctx)["ppl_token"] == pytest.approx(ppl, rel=1e-6)


def test_non_finite_logits_fail_the_cell(tiny_dir, text_file, llm_cache):
    task = make_task(model=str(tiny_dir), corpus=str(text_file), seq_len=SEQ, max_eval_tokens=4 * SEQ,
                     lm_eval=False)
    ctx = make_ctx(llm_cache)
    model = task.model(ctx)
    norm = model.model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.fill_(float("nan"))
    try:
        with pytest.raises(Diverged, match="non-finite NLL"):
            task.evaluate(ctx, model)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval metrics (protocol B)


def expected_lm_eval(model, tokenizer, pages: list[str], max_length: int) -> dict[str, float]:
    """lm-eval's own HFLM rolling log-likelihoods per document, aggregated as the wikitext task does."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1, device="cpu")
    requests = [Instance("loglikelihood_rolling", {}, (page,), i) for i, page in enumerate(pages)]
    lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    n_bytes = sum(len(page.encode("utf-8")) for page in pages)
    total = sum(lls)
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / n_bytes),
            "bits_per_byte": -total / n_bytes / math.log(2), "lm_eval_words": words, "lm_eval_bytes": n_bytes,
            "lm_eval_docs": len(pages)}


def test_lm_eval_metrics_equal_hflm_rolling(tiny_dir, text_file, llm_cache):
    """The task's word/byte perplexity and bits per byte (one document: the text file) against HFLM itself."""
    task = make_task(model=str(tiny_dir), corpus=str(text_file), seq_len=SEQ, max_eval_tokens=SEQ)
    ctx = make_ctx(llm_cache)
    model = task.model(ctx)
    task.evaluate(ctx, model)
    got = metrics(ctx)
    want = expected_lm_eval(model, ctx.shared["llm_loaded"].tokenizer, [text_file.read_text(encoding="utf-8")], SEQ)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
    assert {m["metric"]: m["higher_is_better"] for m in ctx.metrics}["word_perplexity"] is False
    assert ctx.timer.seconds["lm_eval"] > 0


def test_lm_eval_aggregates_documents_and_caps_them(tiny_dir, enwiki, tmp_path):
    """Several documents (pieces of the enwiki test articles): all three, then the first two, scored by lm-eval."""
    docs = [assets.Document(d.title, d.page[: 1500 + 700 * i]) for i, d in enumerate(enwiki.test[:3])]
    loaded = assets.load_causal_lm(str(tiny_dir), tmp_path)
    two = assets.lm_eval_documents(docs, 2, None)
    got = assets.lm_eval_perplexities(loaded.model, loaded.tokenizer, two, tmp_path, SEQ, 4)
    want = expected_lm_eval(loaded.model, loaded.tokenizer, [d.page for d in docs[:2]], SEQ)
    assert got["docs"] == 2 and got["words"] == want["lm_eval_words"] and got["bytes"] == want["lm_eval_bytes"]
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[name] == pytest.approx(want[name], rel=1e-6), name
    every = assets.lm_eval_perplexities(loaded.model, loaded.tokenizer, docs, tmp_path, SEQ, 4)
    assert every["docs"] == 3 and every["word_perplexity"] != pytest.approx(got["word_perplexity"])


def test_lm_eval_word_cap_cuts_at_a_paragraph_break():
    docs = [assets.Document("a", "one two three\n\nfour five"), assets.Document("b", "six seven\n\neight nine ten")]
    assert assets.lm_eval_documents(docs, None, None) == docs
    assert assets.lm_eval_documents(docs, 1, None) == docs[:1]
    # 5 words fit whole, then "six seven" (2 words) fits a cap of 8 but "eight nine ten" does not.
    assert assets.lm_eval_documents(docs, None, 8) == [docs[0], assets.Document("b", "six seven")]
    # A first paragraph longer than the cap is cut at a word boundary.
    assert assets.lm_eval_documents(docs, None, 2) == [assets.Document("a", "one two")]
    assert assets.lm_eval_documents(docs, None, 5) == docs[:1]


# ---------------------------------------------------------------------------------------------------------------------
# Calibration


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, enwiki) -> Path:
    """About 60k characters of the enwiki train split (a few hundred 64-token windows with the tiny tokenizer)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(d.page for d in enwiki.train[10:14])[:60_000], encoding="utf-8")
    return path


def test_calibration_is_fixed_by_the_task_configuration(tiny_dir, calib_file, llm_cache):
    params = dict(model=str(tiny_dir), calib_corpus=str(calib_file), seq_len=SEQ, calib_samples=6, lm_eval=False)
    a, b = make_task(**params), make_task(**params)
    ctx_a, ctx_b = make_ctx(llm_cache, seed=1, task_seed=11), make_ctx(llm_cache, seed=2, task_seed=22)
    batches_a, batches_b = a.calibration_batches(ctx_a), b.calibration_batches(ctx_b)
    assert [tuple(x.shape) for x in batches_a] == [(4, SEQ), (2, SEQ)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    other = make_task(**{**params, "calib_samples": 7}).calibration_batches(make_ctx(llm_cache))
    assert not torch.equal(other[0], batches_a[0])
    # windows are distinct non-overlapping slices of the tokenized calibration text
    tokenizer = ctx_a.shared["llm_loaded"].tokenizer
    ids = torch.tensor(tokenizer(calib_file.read_text(encoding="utf-8"))["input_ids"])
    windows = torch.cat(batches_a)
    slots = ids[: ids.numel() // SEQ * SEQ].view(-1, SEQ)
    assert slots.shape[0] > 100
    match = (slots[None] == windows[:, None]).all(-1)  # windows x slots
    assert bool(match.any(1).all())
    starts = match.float().argmax(1).tolist()
    assert len(set(starts)) == 6 and starts == sorted(starts)
    # the loss is the mean next-token NLL, and differentiable
    model = a.model(ctx_a)
    loss = a.calibration_loss(model, batches_a[0])
    with torch.no_grad():
        logits = model(batches_a[0]).logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batches_a[0][:, 1:].reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(manual), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, [model.model.layers[0].mlp.up_proj.weight])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_calibration_resampled_by_seed(tiny_dir, calib_file, llm_cache):
    """``calib_resample: seed``: each task seed draws its own windows (and keys its statistics and decompositions by
    them); the same seed draws the same windows; the fixed default ignores the seed."""
    params = dict(model=str(tiny_dir), calib_corpus=str(calib_file), seq_len=SEQ, calib_samples=6, lm_eval=False,
                  calib_resample="seed")
    shared: dict = {}
    task = make_task(**params)
    ctx_1, ctx_2 = make_ctx(llm_cache, shared, task_seed=11), make_ctx(llm_cache, shared, task_seed=22)
    w_1, w_2 = task.calibration_windows(ctx_1), task.calibration_windows(ctx_2)
    assert w_1.shape == w_2.shape == (6, SEQ) and not torch.equal(w_1, w_2)
    # what the statistics are computed from: the batches, per seed, also when the memo is shared (one worker)
    assert torch.equal(torch.cat(task.calibration_batches(ctx_1)), w_1)
    assert torch.equal(torch.cat(task.calibration_batches(ctx_2)), w_2)
    again = make_task(**params).calibration_windows(make_ctx(llm_cache, task_seed=11))
    assert torch.equal(again, w_1)
    assert task.calibration_key(ctx_1) != task.calibration_key(ctx_2)
    assert task.decomposition_cache_key(ctx_1) != task.decomposition_cache_key(ctx_2)
    fixed = make_task(**{**params, "calib_resample": "fixed"})
    assert fixed.calibration_key(ctx_1) == fixed.calibration_key(ctx_2) == "fixed"
    assert torch.equal(fixed.calibration_windows(make_ctx(llm_cache, task_seed=11)),
                       fixed.calibration_windows(make_ctx(llm_cache, task_seed=22)))


def test_default_calibration_text_is_the_enwiki_train_split(tiny_dir, text_file, enwiki, llm_cache):
    for corpus in ("enwiki", str(text_file)):
        task = make_task(model=str(tiny_dir), corpus=corpus, lm_eval=False)
        test, calib = task._corpora(make_ctx(llm_cache))
        assert [d.title for d in calib.train] == [d.title for d in enwiki.train]
        assert len(test.test) == (21 if corpus == "enwiki" else 1)


def test_calibration_from_a_text_file(tiny_dir, text_file, llm_cache):
    task = make_task(model=str(tiny_dir), calib_corpus=str(text_file), seq_len=SEQ, calib_samples=200,
                     lm_eval=False)
    ctx = make_ctx(llm_cache)
    windows = torch.cat(task.calibration_batches(ctx))
    ids = task.calibration_ids(ctx)
    assert windows.shape == (200, SEQ) and ids.numel() // SEQ < 200  # more windows than fit: random offsets
    text = text_file.read_text(encoding="utf-8")
    assert torch.equal(ids, torch.tensor(ctx.shared["llm_loaded"].tokenizer(text)["input_ids"]))


# ---------------------------------------------------------------------------------------------------------------------
# The compression protocol end to end


class FullRank(Selector):
    name = "full-rank"

    def select(self, problem):
        return {site.name: site.max_rank for site in problem.sites}


class HalfRank(Selector):
    name = "half-rank"

    def select(self, problem):
        return {site.name: max(1, site.max_rank // 2) for site in problem.sites}


def svd_factorization() -> LowRankFactorization:
    try:
        from rankbench_plugins.factorizations.svd import SVD

        return SVD()
    except ImportError:  # pragma: no cover - before the factorization plugins exist

        class PlainSVD(LowRankFactorization):
            name = "plain-svd"

            def decompose(self, weight, stats):
                U, s, Vh = torch.linalg.svd(weight, full_matrices=False)
                return Decomposition(U, s, Vh)

        return PlainSVD()


def test_end_to_end_full_rank_equals_dense(tiny_dir, text_file, llm_cache):
    task = make_task(model=str(tiny_dir), corpus=str(text_file), seq_len=SEQ, max_eval_tokens=8 * SEQ,
                     calib_samples=4)
    shared: dict = {}
    ref = make_ctx(llm_cache, shared)
    task.setup(ref)
    run_cell(task, ref)
    dense = metrics(ref)
    sites_before = dict(task.target_sites(task.model(ref)))

    full = make_ctx(llm_cache, shared)
    run_cell(task, full, FullRank(), svd_factorization())
    got = metrics(full)
    for name in ("ppl_token", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[name] == pytest.approx(dense[name], rel=1e-4), name
    assert dense["params"] == sum(m.weight.numel() for m in sites_before.values()) and dense["param_ratio"] == 1.0
    assert len(full.ranks_rows) == 14 and got["params"] == sum(r["params"] for r in full.ranks_rows)
    assert task.target_sites(task.model(ref)) == sites_before  # the dense Linears are back

    half = make_ctx(llm_cache, shared)
    run_cell(task, half, HalfRank(), svd_factorization())
    got_half = metrics(half)
    assert math.isfinite(got_half["ppl_token"]) and got_half["ppl_token"] != pytest.approx(dense["ppl_token"])
    assert got_half["param_ratio"] < 1.0 and got_half["model_params"] < dense["model_params"]
    assert shared["counters"]["decompositions"] == 14  # decomposed once, reused by the second selector
    # another suite seed reuses the loaded model and the decompositions
    model = task.model(ref)
    other_seed = make_ctx(llm_cache, shared, seed=5, task_seed=99)
    run_cell(task, other_seed, HalfRank(), svd_factorization())
    assert task.model(other_seed) is model and shared["counters"]["decompositions"] == 14
    assert metrics(other_seed)["ppl_token"] == got_half["ppl_token"]


@pytest.mark.parametrize("module, cls", [("asvd", "ASVD"), ("fwsvd", "FWSVD"), ("svd_llm", "SVDLLM")])
def test_data_aware_factorizations_at_full_rank(tiny_dir, calib_file, llm_cache, module, cls):
    """Calibration statistics (input means, per-batch Fisher through calibration_loss's backward, XᵀX) flow from
    this task's batches into the factorizations; at full rank the model is the dense one again."""
    import importlib

    try:
        factorization = getattr(importlib.import_module(f"rankbench_plugins.factorizations.{module}"), cls)()
    except (ImportError, AttributeError):  # pragma: no cover - while the factorizations are being written
        pytest.skip(f"rankbench_plugins.factorizations.{module} is not available")
    task = make_task(model=str(tiny_dir), corpus=str(calib_file), calib_corpus=str(calib_file), seq_len=SEQ,
                     max_eval_tokens=4 * SEQ, calib_samples=6, lm_eval=False)
    shared: dict = {}
    ref = make_ctx(llm_cache, shared)
    run_cell(task, ref)
    full = make_ctx(llm_cache, shared)
    run_cell(task, full, FullRank(), factorization)
    assert metrics(full)["ppl_token"] == pytest.approx(metrics(ref)["ppl_token"], rel=1e-4)
    assert shared["counters"]["calibration_passes"] == 1


def test_fwsvd_both_axes_on_the_tiny_llama(tiny_dir, calib_file, llm_cache):
    """FWSVD's two axes on the tiny Llama: the per-column Fisher sums of the calibration pass equal a direct
    per-batch computation, the input-axis decomposition equals a weighted SVD computed here (numpy), asking for the
    column sums leaves the row sums' numbers unchanged, and a cell at half rank runs with either axis."""
    from rankbench_plugins.factorizations.fwsvd import FWSVD

    task = make_task(model=str(tiny_dir), corpus=str(calib_file), calib_corpus=str(calib_file), seq_len=SEQ,
                     max_eval_tokens=4 * SEQ, calib_samples=6, lm_eval=False)
    shared: dict = {}
    ctx = make_ctx(llm_cache, shared)
    task.setup(ctx)
    rows_first = {n: s.fisher_rows.clone() for n, s in task.statistics(ctx, ["fisher_rows"]).items()}
    stats = task.statistics(ctx, ["fisher_cols"])  # a second pass, for the new kind only
    both = make_task(**task.params.model_dump()).statistics(make_ctx(llm_cache), ["fisher_rows", "fisher_cols"])
    model, sites = task.model(ctx), task.sites(ctx)
    name = "model.layers.1.mlp.down_proj"
    weight = sites[name].weight
    batches = task.calibration_batches(ctx)
    direct = torch.zeros(weight.shape[1], dtype=torch.float64)
    for batch in batches:
        (grad,) = torch.autograd.grad(task.calibration_loss(model, batch), [weight])
        direct += grad.detach().to(torch.float64).square().sum(dim=0)
    direct /= len(batches)
    torch.testing.assert_close(stats[name].fisher_cols, direct, rtol=1e-5, atol=1e-12)
    for n in sites:
        torch.testing.assert_close(both[n].fisher_rows, rows_first[n], rtol=1e-6, atol=0)
        torch.testing.assert_close(both[n].fisher_cols, stats[n].fisher_cols, rtol=1e-6, atol=0)
    # axis in: the SVD of W diag(sqrt(Ihat)), back-scaled on the right
    fisher = stats[name].fisher_cols.numpy()
    W = weight.detach().to(torch.float64).numpy()
    w = np.sqrt(fisher + 1e-6 * fisher.max())
    U, s, Vt = np.linalg.svd(W * w[None, :], full_matrices=False)
    dec = task.decomposition(ctx, FWSVD(), name)
    np.testing.assert_allclose(dec.s.numpy(), s, rtol=1e-10)
    k = 5
    np.testing.assert_allclose(dec.matrix(k).numpy(), (U[:, :k] * s[:k]) @ Vt[:k] / w[None, :], rtol=1e-8,
                               atol=1e-12)
    ppl = {}
    for axis in ("in", "out"):
        cell = make_ctx(llm_cache, shared)
        run_cell(task, cell, HalfRank(), FWSVD(FWSVD.Params(axis=axis)))
        ppl[axis] = metrics(cell)["ppl_token"]
        assert math.isfinite(ppl[axis])
    assert ppl["in"] != ppl["out"]


def test_bench_run_on_a_tiny_model(tiny_dir, text_file, tmp_path, write_suite, cli):
    import pandas as pd

    suite = write_suite(f"""
        name: llm-tiny
        tasks:
          - llm-perplexity: {{model: "{tiny_dir}", corpus: "{text_file}", seq_len: {SEQ},
                              max_eval_tokens: {4 * SEQ}, calib_samples: 4, lm_eval: false,
                              calib_corpus: "{text_file}"}}
        selectors: [uniform]
        factorizations: [svd]
        budgets: [0.5]
        seeds: [0]
    """)
    result = cli("run", suite, "--out", tmp_path / "out", "--executor", "inprocess")
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(tmp_path / "out" / "metrics")
    ppl = table[table.metric == "ppl_token"]
    assert len(ppl) == 2 and set(ppl.status) == {"ok"} and ppl.value.notna().all()


# ---------------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M (slow: converts the GGUF, ~20 s and 1.6 GB)


@pytest.mark.slow
def test_smollm2_dense_on_enwiki(tmp_path, text_file):
    task = make_task(seq_len=512, max_eval_tokens=2048, lm_eval=False)
    ctx = make_ctx(tmp_path / "cache")
    start = time.perf_counter()
    model = task.model(ctx)
    assert ctx.shared["llm_loaded"].converted
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(task.target_sites(model)) == 30 * 7
    assert task.model_sha == assets.sha256_file(assets.smollm2_gguf_path())
    task.evaluate(ctx, model)
    got = metrics(ctx)
    print(f"SmolLM2 dense ppl_token (4 x 512 tokens of enwiki test): {got['ppl_token']:.3f}, "
          f"{time.perf_counter() - start:.1f} s with the conversion")
    assert got["eval_windows"] == 4 and 5.0 < got["ppl_token"] < 60.0
    # a second load reads the cached folder
    again = assets.load_causal_lm("smollm2-135m", ctx.cache_dir)
    assert not again.converted and again.load_s < 10
    # lm-eval metrics on a small text with the real tokenizer (BOS prefix, byte-level BPE)
    small = make_task(corpus=str(text_file), seq_len=512, max_eval_tokens=512)
    small_ctx = make_ctx(tmp_path / "cache")
    small.evaluate(small_ctx, small.model(small_ctx))
    values = metrics(small_ctx)
    assert 1.0 < values["byte_perplexity"] < 5.0 and values["lm_eval_docs"] == 1


def test_second_derivatives_through_attention(tiny_dir, calib_file, llm_cache):
    """SubLoRA needs Hessian-vector products of the calibration loss w.r.t. singular values, through attention:
    the fused CPU attention kernel has no double backward, so sigma_loss must run on the math kernel."""
    from rankbench_plugins.factorizations.svd import SVD
    from rankbench.kinds.compression import CompressionStatistics

    task = make_task(model=str(tiny_dir), corpus=str(calib_file), calib_samples=4, lm_eval=False)
    ctx = make_ctx(llm_cache)
    task.setup(ctx)
    name = next(iter(task.target_sites(task.model(ctx))))
    stats = CompressionStatistics(task, ctx, SVD())
    sigma = stats.decomposition(name).s[:4].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(stats.sigma_loss({name: sigma}), sigma, create_graph=True)
    (hvp,) = torch.autograd.grad(grad[0], sigma)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
