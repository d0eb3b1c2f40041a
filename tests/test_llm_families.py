"""Task ``llm-perplexity`` on every supported causal-LM family (Llama, Mistral, Qwen2, OPT, GPT-2): tiny randomly
initialised models built here from their configs (hidden 32, 2 layers, a 512-token byte-level BPE vocabulary, tied
embeddings where the family ties them by default), saved to a folder with their tokenizer and loaded through the
task like any local Hugging Face model. Asserted: the sites are exactly the family's attention and MLP projections;
full-rank SVD compression through the real protocol reproduces the dense perplexity; GPT-2's Conv1D projections,
replaced by Linears at load, compute what the original model computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rankbench.api import CellFailure, Selector
from rankbench.context import CellContext
from rankbench.kinds import run_cell
from rankbench_plugins.tasks import _llm_assets as assets
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams

SEQ = 32
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2

# family -> (the projections of layer i, their weight shapes out x in): written out here, independently of the task
LLAMA_SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
                "self_attn.o_proj": (32, 32), "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32),
                "mlp.down_proj": (32, 64)}
EXPECTED = {
    "llama": ("model.layers.{i}.", LLAMA_SHAPES),
    "mistral": ("model.layers.{i}.", LLAMA_SHAPES),
    "qwen2": ("model.layers.{i}.", LLAMA_SHAPES),
    "opt": ("model.decoder.layers.{i}.", {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (32, 32),
                                          "self_attn.v_proj": (32, 32), "self_attn.out_proj": (32, 32),
                                          "fc1": (64, 32), "fc2": (32, 64)}),
    "gpt2": ("transformer.h.{i}.", {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (64, 32),
                                    "mlp.c_proj": (32, 64)}),
}
TIED = {"llama": False, "mistral": False, "qwen2": True, "opt": True, "gpt2": True}


def expected_sites(family: str) -> dict[str, tuple[int, int]]:
    prefix, shapes = EXPECTED[family]
    return {prefix.format(i=i) + leaf: shape for i in range(LAYERS) for leaf, shape in shapes.items()}


def family_config(family: str, tokenizer):
    import transformers

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), tie_word_embeddings=TIED[family],
               initializer_range=0.1)  # larger than the default 0.02: logits far from uniform
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=1024)
    if family == "llama":
        return transformers.LlamaConfig(**llama_like, **ids)
    if family == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=None, **ids)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like, **ids)
    if family == "opt":
        return transformers.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, max_position_embeddings=1024,
                                      word_embed_proj_dim=HIDDEN, **ids)
    return transformers.GPT2Config(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
                                   n_positions=1024, **ids)


def randomize_biases(model: nn.Module, generator: torch.Generator) -> None:
    """Non-zero biases (the families initialise them to zero), so that keeping them through the swap is tested."""
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and not isinstance(module, nn.LayerNorm):
                bias.copy_(0.02 * torch.randn(bias.shape, generator=generator))


def save_tiny_model(folder: Path, family: str, tokenizer, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    randomize_biases(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llm-families-cache")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, llm_cache) -> Path:
    """About 6k characters of Wikipedia prose (the enwiki train split) as the test and calibration text."""
    enwiki = assets.enwiki_corpus(llm_cache)
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("\n\n".join(d.page for d in enwiki.train[:3])[:6000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(text_file):
    return assets.train_tiny_tokenizer([text_file.read_text(encoding="utf-8")])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    return {family: save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, tokenizer)
            for family in EXPECTED}


def make_ctx(cache_dir: Path, shared: dict | None = None) -> CellContext:
    return CellContext(cell_id="test", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None,
                       shared={} if shared is None else shared, cache_dir=Path(cache_dir))


def make_task(**params) -> LLMPerplexity:
    return LLMPerplexity(LLMPerplexityParams.model_validate(params))


class FullRank(Selector):
    name = "full-rank"

    def select(self, problem):
        return {site.name: site.max_rank for site in problem.sites}


def metrics(ctx: CellContext) -> dict[str, float]:
    return {m["metric"]: m["value"] for m in ctx.metrics}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_sites_are_the_familys_attention_and_mlp_projections(family, family_dirs, llm_cache):
    task = make_task(model=str(family_dirs[family]), lm_eval=False)
    model = task.load_model(make_ctx(llm_cache))
    assert model.config.model_type == family
    sites = task.target_sites(model)
    want = expected_sites(family)
    assert len(sites) == len(want) == LAYERS * len(EXPECTED[family][1]) and set(sites) == set(want)  # exactly these
    assert all(type(m) is nn.Linear for m in sites.values())
    assert {name: tuple(m.weight.shape) for name, m in sites.items()} == want
    # embeddings and lm_head are never sites; the head is tied to the input embeddings where the family ties them
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert all(m is not head and m is not embeddings for m in sites.values())
    assert not any("lm_head" in n or "embed" in n or n.endswith(("wte", "wpe")) for n in sites)
    assert (head.weight is embeddings.weight) == TIED[family]
    if family == "qwen2":  # q/k/v carry biases, o_proj does not
        assert [sites[f"model.layers.0.self_attn.{p}_proj"].bias is not None for p in "qkvo"] == [
            True, True, True, False]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_full_rank_svd_reproduces_the_dense_perplexity(family, family_dirs, text_file, llm_cache):
    from rankbench_plugins.factorizations.svd import SVD

    task = make_task(model=str(family_dirs[family]), corpus=str(text_file), calib_corpus=str(text_file),
                     seq_len=SEQ, max_eval_tokens=6 * SEQ, calib_samples=2, calib_batch_size=2, lm_eval=False)
    shared: dict = {}
    dense_ctx = make_ctx(llm_cache, shared)
    run_cell(task, dense_ctx)
    dense = metrics(dense_ctx)
    model = task.model(dense_ctx)
    sites_before = dict(task.target_sites(model))
    batch = task.test_ids(dense_ctx)[: 2 * SEQ].view(2, SEQ)
    with torch.no_grad():
        dense_logits = model(input_ids=batch).logits

    full_ctx = make_ctx(llm_cache, shared)
    run_cell(task, full_ctx, FullRank(), SVD())
    full = metrics(full_ctx)
    assert dense["eval_windows"] == 6
    assert full["ppl_token"] == pytest.approx(dense["ppl_token"], rel=1e-5)
    assert full["param_ratio"] >= 1.0 and len(full_ctx.ranks_rows) == len(expected_sites(family))
    assert task.target_sites(model) == sites_before  # the dense Linears are back

    # the logits at full rank, swapped in by the protocol's own context manager, equal the dense ones
    from rankbench.kinds.compression import swapped

    decompositions = {name: task.decomposition(full_ctx, SVD(), name) for name in sites_before}
    ranks = {name: d.rank for name, d in decompositions.items()}
    with swapped(model, sites_before, SVD(), decompositions, ranks), torch.no_grad():
        assert not task.target_sites(model)  # every projection is a low-rank layer now
        low_rank_logits = model(input_ids=batch).logits
    scale = dense_logits.abs().max()
    assert float((low_rank_logits - dense_logits).abs().max() / scale) < 1e-5


def test_gpt2_conv1d_projections_become_equivalent_linears(family_dirs, llm_cache):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    folder = family_dirs["gpt2"]
    original = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
    convs = {name: m for name, m in original.named_modules() if isinstance(m, Conv1D)}
    assert set(convs) == set(expected_sites("gpt2"))  # GPT-2 builds every projection as a Conv1D

    loaded = assets.load_causal_lm(str(folder), llm_cache).model
    assert not any(isinstance(m, Conv1D) for m in loaded.modules())
    for name, conv in convs.items():
        linear = loaded.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight.is_contiguous()
        assert torch.equal(linear.weight, conv.weight.T) and torch.equal(linear.bias, conv.bias)
        x = torch.randn(5, 3, conv.nx)
        torch.testing.assert_close(linear(x), conv(x), rtol=1e-6, atol=1e-7)
    ids = torch.randint(0, original.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-6,
                                   atol=1e-6)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after the conversion


def test_unknown_family_needs_explicit_sites(family_dirs, llm_cache):
    task = make_task(model=str(family_dirs["llama"]), lm_eval=False)
    model = task.load_model(make_ctx(llm_cache))
    model_type = model.config.model_type
    model.config.model_type = "not-a-family"
    try:
        with pytest.raises(CellFailure, match="no default sites for model_type 'not-a-family'"):
            task.target_sites(model)
        # name fragments select Linears in any family
        fragments = make_task(model=str(family_dirs["llama"]), sites=["self_attn", "mlp"]).target_sites(model)
        assert set(fragments) == set(expected_sites("llama"))
    finally:
        model.config.model_type = model_type


def test_name_fragments_on_gpt2_never_select_the_head(family_dirs, llm_cache):
    task = make_task(model=str(family_dirs["gpt2"]), sites=["mlp", "head", "h."], lm_eval=False)
    model = task.load_model(make_ctx(llm_cache))
    sites = task.target_sites(model)
    assert set(sites) == set(expected_sites("gpt2")) and "lm_head" not in sites
