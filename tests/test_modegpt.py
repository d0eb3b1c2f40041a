"""MoDeGPT (``modegpt`` factorization, ``modegpt-allocation`` selector) on tiny random Llama models built locally:
full rank reproduces the dense logits, each piece (Nyström refit, CR scores and RoPE pairs, value-output SVD)
matches an independent computation, and the allocation follows the paper's rule and meets the budget exactly."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rankbench.api import PluginParams, RankProblem, Site
from rankbench.context import CellContext
from rankbench.kinds import run_cell
from rankbench.kinds.compression import CompressionTask, iter_named_linears
from rankbench.kinds.modules import block_influence
from rankbench_plugins.factorizations.modegpt import (
    ModeGPT, nystrom_down, qk_unit_scores, ridge_leverage_scores, ridge_shift, symmetric_sqrt, value_output_svd,
)
from rankbench_plugins.selectors.modegpt_allocation import ModeGPTAllocation, allocate_sparsity, fill_budget
from rankbench_plugins.factorizations.svd import SVD
from rankbench_plugins.selectors.uniform import UniformSelector
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity

CONFIG = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=100)


class TinyLlama(CompressionTask):
    """A seeded random Llama (weights scaled up so every module matters); calibration and evaluation on random
    token ids; ``logits_error`` = max |logits - dense logits| on a fixed evaluation batch."""

    name = "tiny-llama"
    primary_metric = "logits_error"

    class Params(PluginParams):
        layers: int = 2

    def load_model(self, ctx):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": self.params.layers}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.mul_(10.0)
        model = model.double().eval()
        self.eval_ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            self.dense_logits = model(self.eval_ids).logits
        return model

    def target_sites(self, model):
        return dict(iter_named_linears(model, ("self_attn", "mlp")))

    def transformer_blocks(self, model):
        return LLMPerplexity.transformer_blocks(self, model)

    def calibration_batches(self, ctx):
        g = torch.Generator().manual_seed(3)
        return [torch.randint(0, 100, (4, 16), generator=g) for _ in range(4)]

    def calibration_loss(self, model, batch):
        logits = model(batch).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def evaluate(self, ctx, model):
        with torch.no_grad():
            error = (model(self.eval_ids).logits - self.dense_logits).abs().max()
        ctx.metric("logits_error", float(error), "", False)


def make_ctx(tmp_path, shared, budget):
    return CellContext(cell_id="t", seed=0, task_seed=0, device="cpu", budget=budget, budget_kind="param_ratio",
                       shared=shared, cache_dir=tmp_path)


def metrics(ctx) -> dict[str, float]:
    return {row["metric"]: row["value"] for row in ctx.metrics}


@pytest.mark.parametrize("selector", [ModeGPTAllocation(), UniformSelector()])
def test_full_budget_reproduces_the_dense_logits(tmp_path, selector):
    task, ctx = TinyLlama(), make_ctx(tmp_path, {}, 1.0)
    run_cell(task, ctx, selector, ModeGPT())
    got = metrics(ctx)
    assert got["logits_error"] < 1e-9
    assert got["param_ratio"] == 1.0
    model = task.model(ctx)
    assert type(model.get_submodule("model.layers.0.self_attn")).__name__ == "LlamaAttention"  # restored


def test_budget_met_exactly_and_true_parameter_counts(tmp_path):
    task, shared = TinyLlama(), {}
    for budget in (0.8, 0.55, 0.3):
        ctx = make_ctx(tmp_path, shared, budget)
        run_cell(task, ctx, ModeGPTAllocation(), ModeGPT())
        got = metrics(ctx)
        dense = sum(linear.weight.numel() for linear in task.sites(ctx).values())
        limit = budget * dense
        hidden, heads, kv = 32, 4, 2
        step = max(hidden * 3, 2 * hidden * (heads + kv))  # one MLP channel; one RoPE pair per head (qk)
        assert got["params"] <= limit
        assert limit - got["params"] < step
        # the recorded count is the count of the compressed model's weights
        stored = 0
        model = task.model(ctx)
        rows = {row["site"]: row for row in ctx.ranks_rows}
        for block in range(2):
            mlp, qk, vo = (rows[f"model.layers.{block}.{n}"]["rank"] for n in ("mlp", "self_attn.qk", "self_attn.vo"))
            assert qk % 2 == 0
            stored += 3 * hidden * mlp + qk * hidden * (heads + kv) + vo * hidden * (heads + kv)
        assert stored == got["params"]
        assert 0 < got["logits_error"]
    assert model.get_submodule("model.layers.1.mlp.down_proj").weight.shape == (32, 64)  # dense put back


def test_replaced_modules_store_what_is_recorded(tmp_path):
    """During evaluation the model holds Linears of exactly the recorded sizes."""
    class Counting(TinyLlama):
        def evaluate(self, ctx, model):
            super().evaluate(ctx, model)
            names = [f"model.layers.{i}.{part}" for i in range(2)
                     for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
            self.stored = sum(model.get_submodule(n).weight.numel() for n in names)

    task, ctx = Counting(), make_ctx(tmp_path, {}, 0.5)
    run_cell(task, ctx, ModeGPTAllocation(), ModeGPT())
    assert task.stored == metrics(ctx)["params"]


def test_nystrom_refit_is_the_least_squares_down_projection():
    g = np.random.default_rng(0)
    Z = g.standard_normal((200, 12)) @ g.standard_normal((12, 12))  # intermediate activations, tokens x channels
    W_D = g.standard_normal((12, 5))  # math layout: channels x out
    C = Z.T @ Z
    kept = np.array([1, 4, 5, 9])
    for lam in (0.0, 0.7 * np.trace(C) / 12):
        # brute force: min ||Z_aug W_D - Z_aug S B|| with sqrt(lam) I appended as pseudo-activations
        Z_aug = np.vstack([Z, np.sqrt(lam) * np.eye(12)])
        B, *_ = np.linalg.lstsq(Z_aug[:, kept], Z_aug @ W_D, rcond=None)
        refit = nystrom_down(torch.tensor(W_D.T), torch.tensor(C), torch.tensor(kept), lam)
        np.testing.assert_allclose(refit.numpy(), B.T, atol=1e-9)
    lam = 0.3 * np.trace(C) / 12
    expected = np.diag(C @ np.linalg.inv(C + lam * np.eye(12)))
    np.testing.assert_allclose(ridge_leverage_scores(torch.tensor(C), lam).numpy(), expected, rtol=1e-10)


def test_full_rank_refit_is_exact_with_fewer_tokens_than_channels():
    g = np.random.default_rng(4)
    Z = g.standard_normal((5, 12))  # 5 tokens, 12 channels: C is singular
    W_D = g.standard_normal((12, 3))
    C = torch.tensor(Z.T @ Z)
    refit = nystrom_down(torch.tensor(W_D.T), C, torch.arange(12), ridge_shift(C, 0.01))
    np.testing.assert_allclose(refit.numpy(), W_D.T, atol=1e-10)


def test_mlp_keeps_the_channels_of_largest_ridge_leverage(tmp_path):
    task, ctx = TinyLlama(), make_ctx(tmp_path, {}, 0.5)
    model = task.model(ctx)
    block = task.transformer_blocks(model)[0]
    stats = task.statistics(ctx, ["gram"])
    linears = {n: model.get_submodule(n) for n in block.linears}
    mlp = ModeGPT().decompose_block(block, linears, {n: stats[n] for n in linears})[0]
    C = stats[block.down].gram.numpy()
    lam = 0.01 * np.trace(C) / C.shape[0]
    scores = np.diag(C @ np.linalg.inv(C + lam * np.eye(C.shape[0])))
    np.testing.assert_allclose(mlp.spectrum, np.sort(scores)[::-1], rtol=1e-8)
    built = ModeGPT()._build_mlp(block, mlp, 10, model)
    top = np.sort(np.argsort(-scores, kind="stable")[:10])
    np.testing.assert_array_equal(built[block.up].weight.detach().numpy(), linears[block.up].weight.detach()[top].numpy())


def test_cr_scores_from_explicit_square_roots():
    g = np.random.default_rng(1)
    d, head_dim, group = 10, 6, 2
    X = g.standard_normal((300, d))
    C = X.T @ X
    q_rows = g.standard_normal((group * head_dim, d))  # two query heads sharing one key head
    k_rows = g.standard_normal((head_dim, d))
    k_root = scipy.linalg.sqrtm(k_rows @ C @ k_rows.T).real  # C_K^{1/2}, C_K = W_Kᵀ C W_K
    k_norms = np.linalg.norm(k_root, axis=0)
    plain = np.zeros(head_dim)
    pairs = np.zeros(head_dim // 2)
    for h in range(group):
        Wq = q_rows[h * head_dim:(h + 1) * head_dim]
        q_norms = np.linalg.norm(scipy.linalg.sqrtm(Wq @ C @ Wq.T).real, axis=0)
        plain += q_norms * k_norms
        half = head_dim // 2
        pairs += np.hypot(q_norms[:half], q_norms[half:]) * np.hypot(k_norms[:half], k_norms[half:])
    args = (torch.tensor(q_rows), torch.tensor(k_rows), torch.tensor(C), group)
    np.testing.assert_allclose(qk_unit_scores(*args, rotary=False).numpy(), plain, rtol=1e-8)
    np.testing.assert_allclose(qk_unit_scores(*args, rotary=True).numpy(), pairs, rtol=1e-8)


def test_dropped_rope_pairs_equal_zeroed_query_key_dimensions(tmp_path):
    """Keeping 2 of 4 RoPE pairs per head (values and MLP at full rank) is the dense model with the other pairs'
    query/key rows zeroed: sigma_r(X W S) = sigma_r(X W) S for whole pairs."""
    task, ctx = TinyLlama(), make_ctx(tmp_path, {}, 1.0)
    model = task.model(ctx)
    factorization = ModeGPT()
    stats = task.statistics(ctx, ["gram"])
    replacements, zeroed = {}, {}
    for block in task.transformer_blocks(model):
        linears = {n: model.get_submodule(n) for n in block.linears}
        mlp, qk, vo = factorization.decompose_block(block, linears, {n: stats[n] for n in linears})
        replacements.update(factorization.build(block, [(mlp, 64), (qk, 4), (vo, 8)], model))
        for name, heads in ((block.q, 4), (block.k, 2)):
            weight = linears[name].weight.detach().clone()
            for h in range(heads):
                pairs = set(qk.payload["orders"][h * 2 // heads][:2].tolist())
                for dim in range(8):
                    if dim % 4 not in pairs:
                        weight[h * 8 + dim] = 0.0
            zeroed[name] = weight
    originals = {name: model.get_submodule(name) for name in replacements}
    with torch.no_grad():
        for name, module in replacements.items():
            model.set_submodule(name, module)
        reduced = model(task.eval_ids).logits
        for name, module in originals.items():
            model.set_submodule(name, module)
        saved = {name: model.get_submodule(name).weight.detach().clone() for name in zeroed}
        for name, weight in zeroed.items():
            model.get_submodule(name).weight.copy_(weight)
        masked = model(task.eval_ids).logits
        for name, weight in saved.items():
            model.get_submodule(name).weight.copy_(weight)
    assert (reduced - masked).abs().max() < 1e-10
    assert (reduced - task.dense_logits).abs().max() > 1e-3


def test_value_output_svd_matches_explicit_square_root():
    g = np.random.default_rng(2)
    d, head_dim, group = 8, 4, 2
    X = g.standard_normal((100, d)) * np.linspace(0.2, 3.0, d)
    C = X.T @ X
    v_rows = g.standard_normal((head_dim, d))
    o_blocks = [g.standard_normal((d, head_dim)) for _ in range(group)]
    M = v_rows.T @ np.hstack([o.T for o in o_blocks])
    root = scipy.linalg.sqrtm(C).real
    U, s, Vt = np.linalg.svd(root @ M, full_matrices=False)
    sigma, values, bases = value_output_svd(torch.tensor(v_rows), [torch.tensor(o) for o in o_blocks],
                                            symmetric_sqrt(torch.tensor(C)))
    np.testing.assert_allclose(sigma.numpy(), s[:head_dim], rtol=1e-8)
    for k in (1, 2, 4):
        optimum = np.linalg.inv(root) @ U[:, :k] @ np.diag(s[:k]) @ Vt[:k]  # C^{-1/2} U_k Σ_k V_kᵀ
        np.testing.assert_allclose(values[:, :k].numpy() @ bases[:, :k].numpy().T, optimum, atol=1e-9)
    np.testing.assert_allclose(values.numpy() @ bases.numpy().T, M, atol=1e-9)  # full rank: exact


def test_allocation_follows_the_paper_rule():
    scores = np.array([0.30, 0.05, 0.10, 0.12, 0.40])
    phi = allocate_sparsity(scores, 0.3, 0.1)
    softmax = np.exp(-scores / 0.1) / np.exp(-scores / 0.1).sum()
    np.testing.assert_allclose(phi, 5 * 0.3 * softmax)  # no layer above 1: the closed form
    assert np.argmax(phi) == 1 and np.argmin(phi) == 4  # least influential layer is sparsified most
    capped = allocate_sparsity(scores, 0.5, 0.02)  # the closed form puts > 1 on layer 1
    assert (5 * 0.5 * np.exp(-scores / 0.02) / np.exp(-scores / 0.02).sum()).max() > 1
    assert capped.max() <= 1 + 1e-12 and capped[1] == 1.0
    np.testing.assert_allclose(capped.sum(), 2.5)
    free = capped < 1
    np.testing.assert_allclose(capped[free] / capped[free].sum(), softmax_at(scores, 0.02)[free]
                               / softmax_at(scores, 0.02)[free].sum())


def softmax_at(scores, temperature):
    w = np.exp(-(scores - scores.min()) / temperature)
    return w / w.sum()


def test_fill_budget_meets_the_budget_within_one_step():
    sites = [Site(name=f"m{i}", shape=(50, 7 + i), singular_values=np.ones(50),
                  params_at_rank=lambda k, c=7 + i, unit=2 if i == 1 else 1: (int(k) - int(k) % unit) * c,
                  dense_params=50 * (7 + i), max_rank=50) for i in range(3)]
    for budget in (0.9, 0.5, 0.13):
        problem = RankProblem(sites=sites, budget=budget, budget_kind="param_ratio", seed=0)
        shares = {"m0": 0.2 * 350, "m1": 0.9 * 400, "m2": 0.5 * 450}
        ranks = fill_budget(problem, shares)
        spent = sum(site.params_at_rank(ranks[site.name]) for site in sites)
        limit = budget * problem.dense_params
        assert spent <= limit and limit - spent < 2 * 8  # below by less than the largest step (a pair of m1)


def test_allocation_reads_block_influence(tmp_path):
    task, ctx = TinyLlama(TinyLlama.Params(layers=3)), make_ctx(tmp_path, {}, 0.6)
    run_cell(task, ctx, ModeGPTAllocation(ModeGPTAllocation.Params(temperature=0.05)), ModeGPT())
    influence = block_influence(task, ctx, task.transformer_blocks(task.model(ctx)))
    rows = {row["site"]: row["params"] for row in ctx.ranks_rows}
    kept = [sum(v for k, v in rows.items() if k.startswith(f"model.layers.{i}.")) for i in range(3)]
    order = np.argsort(influence)
    assert kept[order[-1]] >= kept[order[0]]  # the most influential block keeps the most


def test_skips():
    from rankbench.kinds.compression import compression_skip

    plain = object.__new__(type("Plain", (CompressionTask,), {
        "name": "plain", "load_model": None, "target_sites": None, "calibration_batches": None,
        "calibration_loss": None, "evaluate": None}))
    assert "exposes no blocks" in compression_skip(plain, UniformSelector(), ModeGPT())
    assert compression_skip(TinyLlama(), UniformSelector(), ModeGPT()) is None
    assert "per weight" in ModeGPTAllocation().skip(TinyLlama(), SVD())
