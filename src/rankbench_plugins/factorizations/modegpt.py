"""``modegpt``: modular decomposition of transformer blocks (``docs/algorithms.md#modegpt``).

Lin, Gao, Smith, Patel, Tuli, Shen, Jin, Hsu (ICLR 2025), "MoDeGPT: Modular Decomposition for Large Language Model
Compression" (arXiv 2408.09632). Each block is split into three modules of two matrices; each module's inner
dimension is reduced so that its output on the calibration data is reconstructed (X_i: the calibration inputs of the
module, row vectors; math convention y = x W):

    min over the compressed pair  Σ_i || f(X_i; W_1, W_2) - f(X_i; Ŵ_1, Ŵ_2) ||_F²,

with the matrix next to a nonlinearity restricted to column selections Ŵ_1 = W_1 S_k (S_k: k columns of I).

Type I, MLP, f = σ(X W_G) ⊙ (X W_U) W_D (Nyström). With C_σ = Σ_i σ(X_i)ᵀσ(X_i) the correlation of the
intermediate activations (the Gram matrix of down_proj's input), keep the k channels of largest ridge leverage

    τ_j = [C_σ (C_σ + λ I)⁻¹]_jj,    λ = ``ridge`` · tr(C_σ) / d_int,

take those columns of W_G and W_U, and refit the down projection (the paper's Theorem 1, with C_σ + λI, below):

    Ŵ_D = (S_kᵀ C_σ S_k)† S_kᵀ C_σ W_D.

Type II, key-query, f = σ_r(X W_Q,h) σ_r(X W_K,h)ᵀ per head (CR decomposition). The score of a column c is
||C_Q^{1/2}[:, c]|| · ||C_K^{1/2}[:, c]|| with C_Q = W_Qᵀ C W_Q, C_K = W_Kᵀ C W_K and C the Gram matrix of the
attention input; ||C_Q^{1/2} e_c||² = [C_Q]_cc, the energy of query column c on the calibration data. The k
columns of largest score are kept in W_Q and W_K.
  RoPE (rotate-half layout): dimensions c and c + d_h/2 of a head rotate together by a position-dependent angle, so
  σ_r(X W S_k) = σ_r(X W) S_k only when S_k keeps whole pairs. Pairs are the units: the score of pair p is
  ||Q_p||_F ||K_p||_F (the CR bound on the dropped term Q_p R K_pᵀ, R a rotation; rotations keep the norms, so the
  pre-RoPE correlations give it), and the kept dimensions keep their own frequencies (``ReducedAttention``).
  Grouped-query attention: the g query heads of a key/value head share its key columns, so one selection per
  key/value head, by the sum over its query heads of ||Q_h,p|| ||K_p|| (the sum of the heads' CR bounds).

Type III, value-output, f = X W_V,h W_O,h (SVD, the paper's Theorem 3): with C^{1/2} M = U Σ Vᵀ for
M = W_V W_O, the optimum of rank k is Ŵ_V Ŵ_O = C^{-1/2} U_k Σ_k V_kᵀ = M V_k V_kᵀ. This plugin stores
Ŵ_V = W_V W_O V_k and Ŵ_O = V_kᵀ (the same product, without inverting C). Grouped-query attention: the value head
is shared by g query heads with their own W_O,h, so M = W_V [W_O,h1 ... W_O,hg] (the sum of the heads' errors is
the error of this concatenation), one SVD per key/value head.

Ranks (one per module; the same k for every head of a layer, as in the paper): ``mlp`` kept intermediate channels
(k d (2 + gated) parameters), ``qk`` kept query/key dimensions per head (even with RoPE; k d (H + H_kv)), ``vo``
kept value dimensions per head (k d (H + H_kv)). What a selector sees of a module: a descending score per unit --
ridge leverage scores (mlp); per rank the summed pair/column CR scores of the key/value heads (qk, one entry per
dimension); sqrt(Σ_heads σ_j²) of the Type III SVDs, whose tail is the module's truncation error (vo).

Global sparsity allocation: the selector ``modegpt-allocation`` (its own plugin file,
``selectors/modegpt_allocation.py``); any other selector may allocate ranks over the modules too.

Parameters (defaults): ``ridge`` = 0.01 (relative λ).

Deviations from the paper:
* λ of the ridge leverage scores is relative to the mean eigenvalue of C_σ (its scale is the number of calibration
  tokens); I could not read the paper's value, 0.01 is this plugin's choice.
* RoPE pairs, the pair score and the grouped-query rules above are this plugin's derivation from the CR and SVD
  objectives (the paper states the per-head modules for multi-head attention).
* The Nyström refit uses C_σ + λI (the same λ as the scores) in place of C_σ: the least-squares refit on the
  calibration activations plus sqrt(λ) I as pseudo-activations. With fewer calibration tokens than intermediate
  channels (SmolLM2: 1,536 channels; the nightly slice calibrates on 512 tokens) C_σ is singular and the paper's
  refit projects W_D onto the calibration activations' span, even at full rank: measured on the nightly SmolLM2
  settings, the MLPs alone at 80 % with the unregularised refit raised ppl_token from 17.8 to 98.8. With λ the full
  rank reproduces W_D exactly whatever the calibration size, and λ -> 0 is the paper's formula.
* The biases of gate/up/q/k are sliced with their rows; a value bias is not supported (Llama has none).
* Budgets are parameter ratios over the block's Linear weights (the paper's compression rate counts the same
  matrices).

Reference code: no official implementation was found; two unofficial reimplementations (github cbacary/MoDeGPT,
XinruiXiong/MoDeGPT) differ from the paper and each other (e.g. scoring by the inverse diagonal, or a Cholesky
factor's column norms); they were read, not followed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.modules import ModuleDecomposition, ModuleFactorization, TransformerBlock

if TYPE_CHECKING:
    import torch
    from torch import nn

MLP, QK, VO = "mlp", "qk", "vo"


# -- Type I: MLP, Nyström ----------------------------------------------------------------------------------------------
def ridge_shift(correlation: torch.Tensor, ridge: float) -> float:
    """λ = ridge · tr(C)/n, the mean eigenvalue's share (1·ridge where C = 0)."""
    scale = float(correlation.diagonal().sum()) / correlation.shape[0]
    return ridge * (scale if scale > 0 else 1.0)


def ridge_leverage_scores(correlation: torch.Tensor, shift: float) -> torch.Tensor:
    """τ_j = [C (C + λI)⁻¹]_jj."""
    import torch
    eye = torch.eye(correlation.shape[0], dtype=correlation.dtype, device=correlation.device)
    return torch.diagonal(torch.linalg.solve(correlation + shift * eye, correlation))  # (C+λI)⁻¹C: same diagonal


def nystrom_down(down: torch.Tensor, correlation: torch.Tensor, kept: torch.Tensor, shift: float) -> torch.Tensor:
    """The refitted down projection (out x k, torch layout) for the kept channels, with C_λ = C + λI:
    W_Dᵀ C_λ S (Sᵀ C_λ S)⁻¹ (the least-squares refit on the calibration activations plus sqrt(λ) I)."""
    import torch
    regularised = correlation + shift * torch.eye(correlation.shape[0], dtype=correlation.dtype,
                                                  device=correlation.device)
    block = regularised[kept][:, kept]
    cross = regularised[kept] @ down.T  # Sᵀ C_λ W_D (k x out)
    return torch.linalg.solve(block, cross).T


# -- Type II: key-query, CR ----------------------------------------------------------------------------------------------
def column_energy(weight_rows: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """diag(W C Wᵀ) for torch-layout rows W (dims x in): [C_Q]_cc = ||C_Q^{1/2} e_c||²."""
    return ((weight_rows @ gram) * weight_rows).sum(dim=1)


def qk_unit_scores(q_rows: torch.Tensor, k_rows: torch.Tensor, gram: torch.Tensor, group: int,
                   rotary: bool) -> torch.Tensor:
    """CR scores of the units (RoPE pairs, or single dimensions) of one key/value head: Σ over its ``group`` query
    heads of ||Q_h,u|| ||K_u||. ``q_rows``: (group * d_h) x in, ``k_rows``: d_h x in."""
    head_dim = k_rows.shape[0]
    q_energy = column_energy(q_rows, gram).clamp_min(0).view(group, head_dim)
    k_energy = column_energy(k_rows, gram).clamp_min(0)
    if rotary:
        half = head_dim // 2
        q_energy = q_energy[:, :half] + q_energy[:, half:]
        k_energy = k_energy[:half] + k_energy[half:]
    return (q_energy.sqrt() * k_energy.sqrt()).sum(dim=0)


def kept_dimensions(unit_order: torch.Tensor, units: int, head_dim: int, rotary: bool) -> torch.Tensor:
    """The head dimensions kept by the best ``units`` units: sorted dims, or with RoPE the kept pairs' first halves
    then their second halves (the rotate-half layout of the reduced head)."""
    import torch
    chosen = unit_order[:units].sort().values
    return torch.cat([chosen, chosen + head_dim // 2]) if rotary else chosen


# -- Type III: value-output, SVD -----------------------------------------------------------------------------------------
def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    import torch
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def value_output_svd(v_rows: torch.Tensor, o_blocks: list[torch.Tensor],
                     gram_root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one key/value head: M = W_V [W_O,h ...] (math layout, in x g·in), C^{1/2} M = U Σ Vᵀ.
    Returns (σ (d_h), M V (in x d_h), V (g·in x d_h)): Ŵ_V = (M V)[:, :k], Ŵ_O = V[:, :k]ᵀ."""
    import torch
    M = v_rows.T @ torch.cat([o.T for o in o_blocks], dim=1)  # o: out x d_h (torch layout) -> W_O,h = oᵀ
    _, sigma, right = torch.linalg.svd(gram_root @ M, full_matrices=False)
    head_dim = v_rows.shape[0]
    basis = right[:head_dim].T
    return sigma[:head_dim], M @ basis, basis


class ModeGPT(ModuleFactorization):
    name = "modegpt"
    version = "1"
    description = ("MoDeGPT: joint module compression of transformer blocks -- Nyström (MLP), CR (query-key), "
                   "SVD (value-output) -- as smaller Linears.")
    needs: ClassVar[frozenset[str]] = frozenset({"gram"})

    class Params(PluginParams):
        ridge: float = Field(0.01, gt=0.0, description="ridge λ of the MLP leverage scores, times the mean "
                                                       "eigenvalue of the activation correlation")

    def decompose_block(self, block: TransformerBlock, linears, stats) -> list[ModuleDecomposition]:
        import torch
        weights = {name: linear.weight.detach().to(torch.float64) for name, linear in linears.items()}
        if linears[block.v].bias is not None:
            raise ValueError("modegpt does not support a value projection bias")
        attention_gram = stats[block.q].gram.to(weights[block.q])
        return [self._mlp(block, weights, stats[block.down].gram.to(weights[block.down])),
                self._qk(block, weights, attention_gram), self._vo(block, weights, attention_gram)]

    def _mlp(self, block, weights, correlation) -> ModuleDecomposition:
        import torch
        width, hidden = weights[block.up].shape
        shift = ridge_shift(correlation, self.params.ridge)
        scores = ridge_leverage_scores(correlation, shift)
        order = torch.argsort(scores, descending=True, stable=True)
        per_channel = hidden * (3 if block.gate else 2)
        return ModuleDecomposition(
            name=block.down.rsplit(".", 1)[0], block=block.index,
            linears=tuple(n for n in (block.gate, block.up, block.down) if n),
            spectrum=scores[order].cpu().numpy(), shape=(width, per_channel), dense_params=width * per_channel,
            params_at_rank=lambda k: _clip(k, 1, width) * per_channel, feasible=lambda k: _clip(k, 1, width),
            payload={"kind": MLP, "order": order, "correlation": correlation, "shift": shift},
        )

    def _qk(self, block, weights, gram) -> ModuleDecomposition:
        import torch
        head_dim, kv_heads = block.head_dim, block.num_kv_heads
        group = block.num_heads // kv_heads
        q, k = weights[block.q], weights[block.k]
        scores = torch.stack([
            qk_unit_scores(q[j * group * head_dim:(j + 1) * group * head_dim], k[j * head_dim:(j + 1) * head_dim],
                           gram, group, block.rotary)
            for j in range(kv_heads)])
        orders = torch.argsort(scores, dim=1, descending=True, stable=True)
        summed = torch.gather(scores, 1, orders).sum(dim=0)
        unit = 2 if block.rotary else 1
        spectrum = summed.repeat_interleave(unit)
        per_dim = block.hidden_size * (block.num_heads + kv_heads)

        def feasible(rank: int) -> int:
            return _clip(rank - rank % unit, unit, head_dim)

        return ModuleDecomposition(
            name=f"{block.attention}.{QK}", block=block.index, linears=(block.q, block.k),
            spectrum=spectrum.cpu().numpy(), shape=(head_dim, per_dim), dense_params=head_dim * per_dim,
            params_at_rank=lambda r: feasible(r) * per_dim, feasible=feasible,
            payload={"kind": QK, "orders": orders, "unit": unit},
        )

    def _vo(self, block, weights, gram) -> ModuleDecomposition:
        import torch
        head_dim, kv_heads = block.head_dim, block.num_kv_heads
        group = block.num_heads // kv_heads
        v, o = weights[block.v], weights[block.o]
        root = symmetric_sqrt(gram)
        sigmas, values, bases = [], [], []
        for j in range(kv_heads):
            heads = range(j * group, (j + 1) * group)
            sigma, value, basis = value_output_svd(
                v[j * head_dim:(j + 1) * head_dim], [o[:, h * head_dim:(h + 1) * head_dim] for h in heads], root)
            sigmas.append(sigma)
            values.append(value)
            bases.append(basis)
        spectrum = torch.stack(sigmas).pow(2).sum(dim=0).sqrt()
        per_dim = block.hidden_size * (block.num_heads + kv_heads)
        return ModuleDecomposition(
            name=f"{block.attention}.{VO}", block=block.index, linears=(block.v, block.o),
            spectrum=spectrum.cpu().numpy(), shape=(head_dim, per_dim), dense_params=head_dim * per_dim,
            params_at_rank=lambda r: _clip(r, 1, head_dim) * per_dim, feasible=lambda r: _clip(r, 1, head_dim),
            payload={"kind": VO, "values": values, "bases": bases},
        )

    def build(self, block: TransformerBlock, chosen, model: nn.Module) -> dict[str, nn.Module]:
        modules = {d.payload["kind"]: (d, k) for d, k in chosen}
        return {**self._build_mlp(block, *modules[MLP], model),
                **self._build_attention(block, modules[QK], modules[VO], model)}

    def _build_mlp(self, block, decomposition, rank, model) -> dict[str, nn.Module]:
        from rankbench_plugins.factorizations._modegpt_layers import linear
        kept = decomposition.payload["order"][:rank].sort().values
        out = {}
        for name in (block.gate, block.up):
            if name:
                dense = model.get_submodule(name)
                index = kept.to(dense.weight.device)
                bias = None if dense.bias is None else dense.bias.detach()[index]
                out[name] = linear(dense.weight.detach()[index], bias, dense)
        down = model.get_submodule(block.down)
        correlation = decomposition.payload["correlation"]
        weight = nystrom_down(down.weight.detach().to(correlation), correlation, kept.to(correlation.device),
                              decomposition.payload["shift"])
        out[block.down] = linear(weight, None if down.bias is None else down.bias.detach(), down)
        return out

    def _build_attention(self, block, qk, vo, model) -> dict[str, nn.Module]:
        import torch
        from rankbench_plugins.factorizations._modegpt_layers import ReducedAttention, linear
        (qk_d, qk_rank), (vo_d, vo_rank) = qk, vo
        head_dim, kv_heads = block.head_dim, block.num_kv_heads
        group = block.num_heads // kv_heads
        dense = {name: model.get_submodule(name) for name in (block.q, block.k, block.v, block.o)}
        device = dense[block.q].weight.device
        units = qk_rank // qk_d.payload["unit"]
        dims = [kept_dimensions(order, units, head_dim, block.rotary).to(device) for order in qk_d.payload["orders"]]
        q_rows = torch.cat([h * head_dim + dims[h // group] for h in range(block.num_heads)])
        k_rows = torch.cat([j * head_dim + dims[j] for j in range(kv_heads)])
        q, k = dense[block.q], dense[block.k]
        new_q = linear(q.weight.detach()[q_rows], None if q.bias is None else q.bias.detach()[q_rows], q)
        new_k = linear(k.weight.detach()[k_rows], None if k.bias is None else k.bias.detach()[k_rows], k)
        values, bases = vo_d.payload["values"], vo_d.payload["bases"]
        hidden = block.hidden_size
        v_weight = torch.cat([values[j][:, :vo_rank].T for j in range(kv_heads)])
        o_weight = torch.cat([bases[h // group][(h % group) * hidden:(h % group + 1) * hidden, :vo_rank]
                              for h in range(block.num_heads)], dim=1)
        o = dense[block.o]
        new_v = linear(v_weight, None, dense[block.v])
        new_o = linear(o_weight, None if o.bias is None else o.bias.detach(), o)
        rotary_index = torch.stack(dims) if block.rotary else None
        attention = ReducedAttention(model.get_submodule(block.attention), new_q, new_k, new_v, new_o,
                                     block.num_heads, kv_heads, rotary_index)
        return {block.attention: attention}


def _clip(rank: int, low: int, high: int) -> int:
    return max(low, min(int(rank), high))


@hookimpl
def rankbench_register_factorizations(register):
    register(ModeGPT)

