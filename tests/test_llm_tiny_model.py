"""The built-in ``tiny-random-llama`` of task ``llm-perplexity`` (built locally, deterministic, cached atomically), the
random-Llama shapes behind it and ``benchmarks/make_random_llama.py``, the task's conformance configuration on it,
and ``modegpt`` on the families ``transformer_blocks`` offers (Llama, Mistral; Qwen2 refused): full rank reproduces
the dense logits."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankbench.api import SkipCell
from rankbench.kinds import run_cell
from rankbench_plugins.factorizations.modegpt import ModeGPT
from rankbench_plugins.tasks import _llm_assets as assets
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams
from test_llm_families import (FullRank, family_config, family_dirs, llm_cache, make_ctx, metrics, randomize_biases,
                               text_file, tokenizer)

__all__ = ["family_dirs", "llm_cache", "text_file", "tokenizer"]  # fixtures used through pytest

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32

# Llama-3.2-1B's published config.json, written out here independently of the builder's table
LLAMA_32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def llama_parameters(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, tied=True) -> int:
    """Parameters of a Llama counted by hand: embeddings (+ head unless tied), per layer q/k/v/o, gate/up/down and
    two RMSNorm weights, and the final norm."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != assets.MARKER}


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory) -> Path:
    """A cache holding the extracted enwiki corpus (copied into fresh caches so each test extracts it once)."""
    cache = tmp_path_factory.mktemp("tiny-corpus")
    assets.enwiki_corpus(cache)
    return cache


def fresh_cache(corpus_cache: Path, folder: Path) -> Path:
    shutil.copytree(corpus_cache / "corpora", folder / "corpora")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The built-in model


def test_tiny_model_is_built_once_deterministically_with_the_promised_shape(corpus_cache, tmp_path):
    rng_before = torch.random.get_rng_state()
    first = fresh_cache(corpus_cache, tmp_path / "a")
    folder, recipe_sha, built, _ = assets.cached_tiny_model(first)
    assert built and torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert folder.parent == first / "models" and folder.name == f"tiny-random-llama-{recipe_sha[:16]}-v1"
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # the temporary folder was renamed
    assert json.loads((folder / assets.MARKER).read_text())["sha256"] == recipe_sha
    again = assets.cached_tiny_model(first)
    assert again[:3] == (folder, recipe_sha, False)  # the second call reads the cache

    # a second build elsewhere (another cache, same recipe) writes the same bytes: weights, config and tokenizer
    second = fresh_cache(corpus_cache, tmp_path / "b")
    other, other_sha, built_again, _ = assets.cached_tiny_model(second)
    assert built_again and other_sha == recipe_sha and other.name == folder.name
    hashes = file_hashes(folder)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(hashes)
    assert file_hashes(other) == hashes

    loaded = assets.load_causal_lm(assets.TINY_MODEL, first)
    assert loaded.sha256 == hashes["model.safetensors"]  # the model checksum is the weights file's
    model, tok = loaded.model, loaded.tokenizer
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size) == ("llama", 2, 64, 4, 2, 16, 128, 512)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == llama_parameters(512, 64, 128, 2, 4, 2, 16) == 106816
    assert len(tok) == 512 and (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                tok.pad_token_id)
    # byte-level BPE trained on the enwiki train split: lossless, and far fewer tokens than bytes on that prose
    page = assets.enwiki_corpus(first).train[0].page[:4000]
    ids = tok(page)["input_ids"]
    assert tok.decode(ids) == page and len(ids) < 0.7 * len(page.encode("utf-8"))
    # seeded initialisation: std of the projections is initializer_range (0.1), RMSNorm weights are 1
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert abs(float(q.std()) - 0.1) < 0.01 and torch.equal(model.model.norm.weight, torch.ones(64))


def test_a_failed_build_leaves_nothing_behind(corpus_cache, tmp_path, monkeypatch):
    cache = fresh_cache(corpus_cache, tmp_path / "c")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets, "build_random_llama", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        assets.cached_tiny_model(cache)
    assert not [p for p in (cache / "models").iterdir() if p.is_dir()]  # neither the folder nor a temporary one


def test_the_model_parameter_accepts_the_tiny_model():
    assert LLMPerplexityParams(model="tiny-random-llama").model == "tiny-random-llama"
    assert assets.model_kind("tiny-random-llama") == "builtin"


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and the script


def test_llama_32_1b_shape_has_the_published_size():
    from transformers import LlamaForCausalLM

    tok = assets.train_tiny_tokenizer(["a small text to train on, a small text"])
    config = assets.random_llama_config("llama-3.2-1b", tok)
    for key, value in LLAMA_32_1B.items():
        assert getattr(config, key) == value, key
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.rope_parameters["rope_type"] == "llama3"
    with torch.device("meta"):  # counted without memory
        model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == llama_parameters(128256, 2048, 8192, 16, 32, 8, 64) == 1_235_814_400
    with pytest.raises(assets.AssetError, match="unknown random Llama shape"):
        assets.random_llama_config("llama-9b", tok)


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_random_llama", ROOT / "benchmarks" / "make_random_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_builds_a_loadable_seeded_model(corpus_cache, tmp_path, capsys):
    script = load_script()
    outs = []
    for name, seed in (("s1", 1), ("s1-again", 1), ("s2", 2)):
        outs.append(tmp_path / name)
        assert script.main(["--shape", "tiny", "--out", str(outs[-1]), "--seed", str(seed), "--cache",
                            str(corpus_cache)]) == 0
    assert "parameters 106,816" in capsys.readouterr().out
    one, again, two = (file_hashes(o) for o in outs)
    assert one == again and one["model.safetensors"] != two["model.safetensors"]
    assert one["tokenizer.json"] == two["tokenizer.json"]  # the seed is the weights' only
    loaded = assets.load_causal_lm(str(outs[0]), corpus_cache)
    assert loaded.model.config.num_hidden_layers == 2 and loaded.sha256 == one["model.safetensors"]
    # seed 0 is the built-in model's recipe: the same bytes as the cached tiny-random-llama
    built = assets.cached_tiny_model(fresh_cache(corpus_cache, tmp_path / "builtin"))[0]
    assert script.main(["--shape", "tiny", "--out", str(tmp_path / "s0"), "--cache", str(corpus_cache)]) == 0
    assert file_hashes(tmp_path / "s0") == file_hashes(built)
    with pytest.raises(SystemExit) as exists:
        script.main(["--shape", "tiny", "--out", str(outs[0])])
    assert exists.value.code == 2 and "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_script_is_deterministic_across_processes(tmp_path):
    env = {"RANKBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "make_random_llama.py"
    outs = []
    for name, seed in (("s1", 1), ("s1-again", 1)):
        out = tmp_path / name
        result = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--out", str(out), "--seed",
                                 str(seed)], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        outs.append(out)
    assert "parameters 106,816" in result.stdout
    assert file_hashes(outs[0]) == file_hashes(outs[1])
    bad = subprocess.run([sys.executable, str(script), "--shape", "huge", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The conformance configuration


def test_conformance_configuration_runs_the_tiny_model(corpus_cache, tmp_path):
    (params,) = LLMPerplexity.conformance_params()
    task = LLMPerplexity(LLMPerplexityParams.model_validate(params))
    assert task.params.model == "tiny-random-llama" and task.params.lm_eval
    ctx = make_ctx(fresh_cache(corpus_cache, tmp_path / "d"))
    run_cell(task, ctx)
    m = metrics(ctx)
    windows = params["max_eval_tokens"] // params["seq_len"]
    assert (m["eval_windows"], m["eval_tokens"]) == (windows, windows * (params["seq_len"] - 1))
    # the 14 sites: q, k, v, o, gate, up, down of 2 layers (k/v of the grouped-query heads: 32 x 64)
    assert len(task.target_sites(task.model(ctx))) == 14
    assert m["model_params"] == 106816 and m["params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    # only the first max_text_chars characters are tokenized, of the test text and of the calibration text
    tok = task._loaded(ctx).tokenizer
    corpus = assets.enwiki_corpus(ctx.cache_dir)
    cut = params["max_text_chars"]
    for ids, docs in ((task.test_ids(ctx), corpus.test), (task.calibration_ids(ctx), corpus.train)):
        assert ids.tolist() == tok("\n\n".join(d.page for d in docs)[:cut])["input_ids"]
    # ppl_token recomputed independently from the logits of the evaluated windows
    model = task.model(ctx)
    x = task.test_ids(ctx)[: windows * SEQ].view(windows, SEQ)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, x[:, 1:, None]).sum()
    assert m["ppl_token"] == pytest.approx(float(torch.exp(nll / (windows * (SEQ - 1)))), rel=1e-6)
    # lm-eval on the first 200 words of the first test document (cut at a paragraph break)
    (doc,) = assets.lm_eval_documents(corpus.test, 1, 200)
    assert (m["lm_eval_docs"], m["lm_eval_words"]) == (1, assets.doc_counts(doc.page)[0]) and m["lm_eval_words"] <= 200
    assert m["bits_per_byte"] == pytest.approx(math.log2(m["byte_perplexity"]))
    assert math.log(m["word_perplexity"]) * m["lm_eval_words"] == pytest.approx(
        math.log(m["byte_perplexity"]) * m["lm_eval_bytes"], rel=1e-9)  # one total NLL, two normalisations


def test_modegpt_conforms_on_the_tiny_model():
    from rankbench.conformance import run_conformance

    report = run_conformance("modegpt")
    assert report.passed, report.rows()
    runs = [c for c in report.checks if c.check == "runs"]
    assert [(c.scope, c.verdict) for c in runs] == [("compression on llm-perplexity[0]", "pass")]
    assert [c.verdict for c in report.checks if c.check in ("budget", "deterministic")] == ["pass", "pass"]


# ---------------------------------------------------------------------------------------------------------------------
# modegpt on the families transformer_blocks offers


class LogitsAtEvaluation(LLMPerplexity):
    """``llm-perplexity`` that also records, while the cell evaluates (the compressed modules swapped in), the logits
    of a fixed batch and the type of the first attention module."""

    batch: torch.Tensor | None = None

    def evaluate(self, ctx, model):
        super().evaluate(ctx, model)
        if self.batch is None:
            return
        with torch.no_grad():
            self.logits = model(input_ids=self.batch).logits
        self.attention_type = type(model.model.layers[0].self_attn).__name__


def save_mistral_with_window(folder: Path, tokenizer, window: int) -> Path:
    """The families' tiny Mistral with a sliding attention window shorter than the windows evaluated."""
    from transformers import AutoModelForCausalLM

    config = family_config("mistral", tokenizer)
    config.sliding_window = window
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    randomize_biases(model, torch.Generator().manual_seed(1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "mistral", "mistral-window"])
def test_full_rank_modegpt_reproduces_the_dense_logits(family, family_dirs, tokenizer, text_file, llm_cache,
                                                       tmp_path):
    from rankbench_plugins.selectors.uniform import UniformSelector

    folder = (save_mistral_with_window(tmp_path / "mistral-window", tokenizer, 8) if family == "mistral-window"
              else family_dirs[family])
    params = dict(model=str(folder), corpus=str(text_file), calib_corpus=str(text_file), seq_len=SEQ,
                  max_eval_tokens=6 * SEQ, calib_samples=4, calib_batch_size=2, lm_eval=False)
    task = LogitsAtEvaluation(LLMPerplexityParams.model_validate(params))
    shared: dict = {}
    dense_ctx = make_ctx(llm_cache, shared)
    run_cell(task, dense_ctx)
    model = task.model(dense_ctx)
    assert model.config.model_type == family.split("-")[0]
    if family == "mistral-window":
        assert model.config.sliding_window == 8 < SEQ
    task.batch = task.test_ids(dense_ctx)[: 2 * SEQ].view(2, SEQ)
    with torch.no_grad():
        dense_logits = model(input_ids=task.batch).logits
    blocks = task.transformer_blocks(model)
    assert [b.block for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert (blocks[0].num_heads, blocks[0].num_kv_heads, blocks[0].head_dim, blocks[0].rotary) == (4, 2, 8, True)

    full_ctx = make_ctx(llm_cache, shared)
    run_cell(task, full_ctx, FullRank(), ModeGPT())
    assert task.attention_type == "ReducedAttention"  # modegpt's modules were in place during evaluation
    scale = float(dense_logits.abs().max())
    assert float((task.logits - dense_logits).abs().max()) / scale < 1e-5
    assert metrics(full_ctx)["ppl_token"] == pytest.approx(metrics(dense_ctx)["ppl_token"], rel=1e-5)
    assert metrics(full_ctx)["param_ratio"] == pytest.approx(1.0)
    assert type(model.model.layers[0].self_attn).__name__ != "ReducedAttention"  # the dense modules are back

    # compressed (80 % of the parameters): the logits move, the cell stays within its budget
    small_ctx = make_ctx(llm_cache, shared)
    small_ctx.budget, small_ctx.budget_kind = 0.8, "param_ratio"
    run_cell(task, small_ctx, UniformSelector(), ModeGPT())
    assert metrics(small_ctx)["param_ratio"] <= 0.8 + 1e-9
    assert float((task.logits - dense_logits).abs().max()) / scale > 1e-3


def test_qwen2_offers_no_blocks_so_modegpt_skips(family_dirs, text_file, llm_cache):
    params = dict(model=str(family_dirs["qwen2"]), corpus=str(text_file), calib_corpus=str(text_file), seq_len=SEQ,
                  max_eval_tokens=2 * SEQ, calib_samples=2, calib_batch_size=2, lm_eval=False)
    task = LLMPerplexity(LLMPerplexityParams.model_validate(params))
    ctx = make_ctx(llm_cache)
    assert task.transformer_blocks(task.model(ctx)) is None  # q/k/v biases: see transformer_blocks' docstring
    with pytest.raises(SkipCell, match="exposes no transformer blocks for modegpt"):
        run_cell(task, ctx, FullRank(), ModeGPT())
