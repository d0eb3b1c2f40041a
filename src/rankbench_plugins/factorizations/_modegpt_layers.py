"""The torch module of ``modegpt``: a Hugging Face Llama attention whose heads keep fewer query/key and value
dimensions (imported only when a cell builds one, so the plugin module stays light)."""

from __future__ import annotations

import torch
from torch import nn


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q kᵀ * scaling + mask) v with grouped key/value heads (Hugging Face's eager attention)."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ReducedAttention(nn.Module):
    """Llama (or Mistral) attention with ``qk_dims`` query/key and ``v_dims`` value dimensions per head.

    ``rotary_index`` (key/value heads x ``qk_dims``): per key/value head (and its query heads) the original head
    dimensions the kept query/key dimensions are, ordered (kept pairs' first halves, then the same pairs' second
    halves), so rotate-half RoPE on the reduced vectors with
    cos/sin restricted to these indices is RoPE of the original dimensions. The softmax scale stays the dense one
    (1/sqrt(head_dim)): the kept scores are the dense scores' terms, unscaled. Same call signature as Hugging Face's
    ``LlamaAttention`` (``position_embeddings``, ``attention_mask``, ``cache``), so the decoder layer is unchanged.
    """

    def __init__(self, dense: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                 num_heads: int, num_kv_heads: int, rotary_index: torch.Tensor | None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.config = dense.config
        self.layer_idx = getattr(dense, "layer_idx", None)
        self.scaling = dense.scaling
        self.is_causal = True
        self.attention_dropout = getattr(dense, "attention_dropout", 0.0)
        # Mistral: the window is in the attention mask the model builds, and passed on for flash attention as the
        # dense Mistral/Qwen2 attention passes it (per layer where the dense module holds one); Llama: None
        self.sliding_window = (dense.sliding_window if hasattr(dense, "sliding_window")
                               else getattr(dense.config, "sliding_window", None))
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.qk_dims = q.out_features // num_heads
        self.v_dims = v.out_features // num_kv_heads
        self.register_buffer("rotary_index", rotary_index, persistent=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = kwargs.pop("past_key_values", cache)
        shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*shape, self.num_heads, self.qk_dims).transpose(1, 2)
        key = self.k_proj(hidden_states).view(*shape, self.num_kv_heads, self.qk_dims).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*shape, self.num_kv_heads, self.v_dims).transpose(1, 2)
        if self.rotary_index is not None:
            # per key/value head its own kept dimensions: (batch, kv heads, tokens, qk_dims)
            cos, sin = (t[..., self.rotary_index].permute(0, 2, 1, 3) for t in position_embeddings)
            key = key * cos + _rotate_half(key) * sin
            cos, sin = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (cos, sin))
            query = query * cos + _rotate_half(query) * sin
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        output, weights = attend(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(output.reshape(*shape, -1).contiguous()), weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding ``weight`` (out x in) and ``bias`` in ``like``'s dtype and device."""
    out_features, in_features = weight.shape
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None,
                               device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(like.weight.requires_grad)
    return layer
