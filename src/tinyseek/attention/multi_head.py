"""Softmax attention with RoPE and grouped-query heads (LLaMA's): the module and its decode step."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from tinyseek.attention.registry import (
    AttentionSpec,
    causal_mask,
    mean_causal_context,
    register_attention,
    require_whole_heads,
)
from tinyseek.config import TinySeekConfig, require_positive
from tinyseek.decoding import Rotary, Step, joined_bias, project, rotated_rows, transposed, write_columns
from tinyseek.errors import ConfigError
from tinyseek.layers import apply_rotary
# A drop-in nn.Linear whose bf16-autocast matmuls avoid torch's slow CPU fallback (see tinyseek.ops).
from tinyseek.ops import Linear, fused_linear, scaled_dot_product_attention


def validate_multi_head_attention(config: TinySeekConfig) -> None:
    require_whole_heads(config)
    require_positive(config, "num_key_value_heads")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(
            f"num_key_value_heads: num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if config.head_dim % 2:
        raise ConfigError(f"hidden_size: head dimension {config.head_dim} must be even for RoPE")


class MultiHeadAttention(nn.Module):
    """Causal softmax attention with RoPE and grouped-query heads, through fused SDPA."""

    def __init__(self, config: TinySeekConfig):
        super().__init__()
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.dropout = config.attention_dropout

    def forward(self, x, rotary, causal_mask, padding_mask, cache_layer=None):
        batch, seq_len, _ = x.shape
        query, key, value = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        query = query.reshape(batch, seq_len, self.num_heads, -1).transpose(1, 2)
        key = key.reshape(batch, seq_len, self.num_kv_heads, -1).transpose(1, 2)
        value = value.reshape(batch, seq_len, self.num_kv_heads, -1).transpose(1, 2)
        query, key = apply_rotary(query, rotary), apply_rotary(key, rotary)
        if cache_layer is not None:
            key, value = cache_layer.update(key, value)
        output = scaled_dot_product_attention(
            query, key, value, attn_mask=causal_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal_mask is None and seq_len > 1, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(output.transpose(1, 2).reshape(batch, seq_len, -1))


class MultiHeadAttentionStep:
    """x -> one GEMM for the query, key, value and their RoPE-rotated copies; attention against the preallocated
    keys and values."""

    decodes = MultiHeadAttention

    def __init__(self, module: MultiHeadAttention, weights_dtype: torch.dtype | None = None):
        self.heads, self.kv_heads, self.head_dim = module.num_heads, module.num_kv_heads, module.head_dim
        self.dtype = module.q_proj.weight.dtype
        # x -> [q | k | v | rotate_half(q) | rotate_half(k)] in one GEMM, with the softmax scale folded into q.
        scale = self.head_dim**-0.5
        layers = (module.q_proj, module.k_proj, module.v_proj)
        q_and_k = torch.cat((module.q_proj.weight.detach() * scale, module.k_proj.weight.detach()))
        self.qkv = transposed(q_and_k, module.v_proj.weight, rotated_rows(q_and_k, self.head_dim), dtype=weights_dtype)
        bias = joined_bias(layers)
        if bias is not None:
            bias[: self.heads * self.head_dim] *= scale
            q_and_k_bias = bias[: (self.heads + self.kv_heads) * self.head_dim]
            bias = torch.cat((bias, rotated_rows(q_and_k_bias[:, None], self.head_dim)[:, 0]))
        self.qkv_bias = bias
        self.out, self.out_bias = transposed(module.o_proj.weight, dtype=weights_dtype), joined_bias([module.o_proj])

    def new_cache(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        return self.qkv.new_zeros(shape, dtype=self.dtype), self.qkv.new_zeros(shape, dtype=self.dtype)

    def load(self, cache, cache_layer, length: int) -> None:
        cache[0][:, :, :length] = cache_layer.keys
        cache[1][:, :, :length] = cache_layer.values

    def __call__(self, x: torch.Tensor, step: Step, cache, rotary: Rotary) -> torch.Tensor:
        batch, keys, values = x.shape[0], cache[0], cache[1]
        heads = self.heads + self.kv_heads
        qkv = project(x, self.qkv, self.qkv_bias).view(batch, -1, self.head_dim)
        q_and_k = rotary.apply(qkv[:, :heads], qkv[:, heads + self.kv_heads :], step.cos, step.sin)
        write_columns(keys, 2, step.column, q_and_k[:, self.heads :, None])
        write_columns(values, 2, step.column, qkv[:, heads : heads + self.kv_heads, None])
        # Two batched matmuls, query heads grouped by their key head: for one query row this is several times
        # faster than SDPA's kernel, whose set-up costs more than the arithmetic.
        query = q_and_k[:, : self.heads].view(batch, self.kv_heads, -1, self.head_dim)
        scores = query @ keys[:, :, : step.length].transpose(2, 3)
        bias = self.attention_bias(step)
        if bias is not None:
            scores = scores + bias
        output = scores.softmax(dim=-1) @ values[:, :, : step.length]
        return project(output.view(batch, -1), self.out, self.out_bias)

    def attention_bias(self, step: Step) -> torch.Tensor | None:
        """What is added to the scores over the attended cache columns: the padding mask, if any."""
        return step.mask


register_attention("mha", AttentionSpec(
    cache_layer=lambda config: DynamicLayer(),
    rotary_dim=lambda config: config.head_dim,
    mask=causal_mask,
    decode_step=MultiHeadAttentionStep,
    flops_per_token=lambda config, seq_len: 6 * config.num_attention_heads * 2 * config.head_dim * mean_causal_context(seq_len),
    validate=validate_multi_head_attention,
    transformers_export="llama",
    no_export_reason=None,
))(MultiHeadAttention)
