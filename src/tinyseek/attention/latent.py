"""DeepSeek's multi-head latent attention (MLA): the module, with its expanded and absorbed forms, and its decode
step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from tinyseek.attention.registry import AttentionSpec, causal_mask, mean_causal_context, register_attention
from tinyseek.config import TinySeekConfig, require_positive
from tinyseek.decoding import Rotary, Step, arranged, joined_bias, project, rotated_rows, transposed, write_columns
from tinyseek.errors import ConfigError
from tinyseek.layers import RMSNorm, apply_rotary
# A drop-in nn.Linear whose bf16-autocast matmuls avoid torch's slow CPU fallback (see tinyseek.ops).
from tinyseek.ops import Linear, fused_linear, scaled_dot_product_attention

# DeepSeek's reference normalises the compressed latents with a fixed epsilon, whatever the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def validate_latent_attention(config: TinySeekConfig) -> None:
    require_positive(config, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
    if not isinstance(config.qk_nope_head_dim, int) or config.qk_nope_head_dim < 0:
        raise ConfigError(f"qk_nope_head_dim: must be a non-negative integer, got {config.qk_nope_head_dim!r}")
    if config.q_lora_rank is not None:
        require_positive(config, "q_lora_rank")
    if config.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim: must be even for RoPE, got {config.qk_rope_head_dim}")


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention.

    Keys and values are up-projected from one low-rank latent c_kv = RMSNorm(W_dkv h) (kv_lora_rank numbers per
    token); a single RoPE key of qk_rope_head_dim is shared by all heads. Queries are optionally compressed the same
    way. The cache holds only c_kv and the RoPE key. With a cache, the key up-projection is absorbed into the query
    and the value up-projection into the output, so per-head keys and values are never expanded over the context.
    A prefill (a prompt into an empty cache) attends in the expanded form, like training: over a whole prompt the
    fused SDPA kernel beats the absorbed products (``benchmarks/decode_speed.py`` measures both).
    """

    expanded_prefill = True

    def __init__(self, config: TinySeekConfig):
        super().__init__()
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, hidden, bias=bias)
        self.scale = qk_dim**-0.5
        self.dropout = config.attention_dropout

    def forward(self, x, rotary, causal_mask, padding_mask, cache_layer=None):
        batch, seq_len, _ = x.shape
        # Both projections of x (the query's, or its low-rank latent's, and the compressed key/value latent's) in one GEMM.
        query, compressed_kv = fused_linear(x, (self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa))
        if self.q_lora_rank is not None:
            query = self.q_b_proj(self.q_a_layernorm(query))
        query = query.reshape(batch, seq_len, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = query.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = compressed_kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [B, 1, T, r]: one "head", as the cache stores it
        q_rope, k_rope = apply_rotary(q_rope, rotary), apply_rotary(k_rope.unsqueeze(1), rotary)
        dropout = self.dropout if self.training else 0.0
        expanded = cache_layer is None or (self.expanded_prefill and seq_len > 1 and cache_layer.get_seq_length() == 0)
        if cache_layer is not None:
            latent, k_rope = cache_layer.update(latent, k_rope)
        attention = self.expanded_attention if expanded else self.absorbed_attention
        output = attention(q_nope, q_rope, latent, k_rope, causal_mask, dropout)
        return self.o_proj(output.transpose(1, 2).reshape(batch, seq_len, -1))

    def expanded_attention(self, q_nope, q_rope, latent, k_rope, causal_mask, dropout):
        """Training form: up-project the latent into per-head keys and values and run fused SDPA."""
        batch, _, seq_len, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(batch, seq_len, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        key = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        # SDPA's fused (flash) kernels need values as wide as the keys; with v_head_dim != qk_head_dim it falls back
        # to the unfused math path (on CPU much slower in training). Zero value columns change no other column's
        # output, so pad, attend, and slice them off again.
        pad = key.shape[-1] - self.v_dim
        output = scaled_dot_product_attention(
            query, key, F.pad(value, (0, pad)) if pad > 0 else value, attn_mask=causal_mask, dropout_p=dropout,
            is_causal=causal_mask is None and seq_len > 1, scale=self.scale,
        )
        return output[..., : self.v_dim] if pad > 0 else output

    def absorbed_attention(self, q_nope, q_rope, latent, k_rope, causal_mask, dropout):
        """Decoding form: scores = (q_nope W_uk) c_kv^T + q_rope k_rope^T; out = (softmax c_kv) W_uv^T.

        Heads are folded into the query axis so each product is one batched matmul against the shared latent.
        """
        batch, heads, q_len, _ = q_nope.shape
        context_len = latent.shape[2]
        up = self.kv_b_proj.weight.view(heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        up_key, up_value = up.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, up_key.to(q_nope.dtype))
        latent, k_rope = latent.squeeze(1), k_rope.squeeze(1)  # [B, S, r], [B, S, d_rope]
        scores = q_latent.reshape(batch, heads * q_len, -1) @ latent.transpose(1, 2).to(q_latent.dtype)
        scores = scores + q_rope.reshape(batch, heads * q_len, -1) @ k_rope.transpose(1, 2).to(q_rope.dtype)
        scores = scores.view(batch, heads, q_len, context_len).float() * self.scale
        if causal_mask is None and q_len > 1:
            causal_mask = torch.ones(q_len, context_len, dtype=torch.bool, device=scores.device).tril(context_len - q_len)
        if causal_mask is not None:
            scores = scores.masked_fill(~causal_mask, float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), dropout).to(latent.dtype)
        context = (probs.view(batch, heads * q_len, context_len) @ latent).view(batch, heads, q_len, -1)
        return torch.einsum("bhtr,hvr->bhtv", context, up_value.to(context.dtype))


class LatentAttentionStep:
    """Absorbed MLA: q_latent_h = (W_uk_h^T W_q_nope_h) x and out = sum_h W_o_h W_uv_h context_h, folded once (the
    softmax scale too); the keys are the cache [c_kv | k_rope] itself and the values its first kv_lora_rank
    columns, so attention is two batched matmuls against one shared cache for all heads."""

    decodes = MultiHeadLatentAttention

    def __init__(self, module: MultiHeadLatentAttention, weights_dtype: torch.dtype | None = None):
        self.dtype = module.kv_b_proj.weight.dtype
        weights_dtype = weights_dtype or self.dtype
        heads, nope, rope, v_dim = module.num_heads, module.nope_dim, module.rope_dim, module.v_dim
        rank = module.kv_lora_rank
        self.heads, self.rank, self.rope = heads, rank, rope
        up = module.kv_b_proj.weight.detach().view(heads, nope + v_dim, rank)
        up_key, up_value = up[:, :nope], up[:, nope:]
        query_layer = module.q_proj if module.q_lora_rank is None else module.q_b_proj
        query = query_layer.weight.detach().view(heads, nope + rope, -1) * module.scale
        q_latent = (up_key.transpose(1, 2) @ query[:, :nope]).flatten(0, 1)
        q_rope = query[:, nope:].flatten(0, 1)
        # Rows producing [q_latent (H x r) | q_rope (H x d) | rotate_half(q_rope)] from the query's input.
        query_rows = torch.cat((q_latent, q_rope, rotated_rows(q_rope, rope)))
        compress = module.kv_a_proj_with_mqa.weight.detach()
        k_rope = compress[rank:]
        # Rows producing [c_kv | k_rope | rotate_half(k_rope)] from x.
        compress_rows = torch.cat((compress, rotated_rows(k_rope, rope)))
        compress_bias = module.kv_a_proj_with_mqa.bias
        if compress_bias is not None:
            compress_bias = torch.cat((compress_bias.detach(), rotated_rows(compress_bias.detach()[rank:, None], rope)[:, 0]))
        self.q_lora = module.q_lora_rank is not None
        if self.q_lora:  # x -> [q latent | c_kv | k_rope | rot]; normalised q latent -> query rows
            self.first = transposed(module.q_a_proj.weight, compress_rows, dtype=weights_dtype)
            self.first_bias = joined_bias([module.q_a_proj, module.kv_a_proj_with_mqa])
            if self.first_bias is not None:
                self.first_bias = torch.cat((self.first_bias, self.first_bias.new_zeros(rope)))
                if compress_bias is not None:
                    self.first_bias[module.q_lora_rank :] = compress_bias
            self.q_norm, self.q_norm_eps = module.q_a_layernorm.weight.detach().contiguous(), module.q_a_layernorm.eps
            self.query = transposed(query_rows, dtype=weights_dtype)
            self.split = [module.q_lora_rank, rank, rope, rope]
        else:  # x -> [query rows | c_kv | k_rope | rot] in one GEMM
            self.first = transposed(query_rows, compress_rows, dtype=weights_dtype)
            self.first_bias = None
            if compress_bias is not None:
                self.first_bias = torch.cat((compress_bias.new_zeros(query_rows.shape[0]), compress_bias))
            self.split = [query_rows.shape[0], rank, rope, rope]
        self.kv_norm, self.kv_norm_eps = module.kv_a_layernorm.weight.detach().contiguous(), module.kv_a_layernorm.eps
        out = module.o_proj.weight.detach().view(-1, heads, v_dim)
        self.out = arranged(torch.einsum("ohv,hvr->hro", out, up_value).flatten(0, 1), weights_dtype)
        self.out_bias = joined_bias([module.o_proj])

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        return self.out.new_zeros(batch, capacity, self.rank + self.rope, dtype=self.dtype)

    def load(self, cache, cache_layer, length: int) -> None:
        cache[:, :length, : self.rank] = cache_layer.keys[:, 0]
        cache[:, :length, self.rank :] = cache_layer.values[:, 0]

    def __call__(self, x: torch.Tensor, step: Step, cache, rotary: Rotary) -> torch.Tensor:
        batch, heads, rank, rope = x.shape[0], self.heads, self.rank, self.rope
        query, latent, k_rope, k_rotated = project(x, self.first, self.first_bias).split(self.split, dim=-1)
        if self.q_lora:
            query = project(F.rms_norm(query, query.shape[-1:], self.q_norm, self.q_norm_eps), self.query)
        q_latent = query[:, : heads * rank].view(batch, heads, rank)
        q_rope = query[:, heads * rank :].view(batch, 2, heads, rope)
        q_rope = Rotary.apply(q_rope[:, 0], q_rope[:, 1], step.cos, step.sin)
        latent = F.rms_norm(latent, latent.shape[-1:], self.kv_norm, self.kv_norm_eps)
        k_rope = Rotary.apply(k_rope, k_rotated, step.cos[:, 0], step.sin[:, 0])
        write_columns(cache, 1, step.column, torch.cat((latent, k_rope), dim=-1)[:, None])
        keys = cache[:, : step.length]
        scores = torch.bmm(torch.cat((q_latent, q_rope), dim=-1), keys.transpose(1, 2))
        if step.mask is not None:
            scores = scores + step.mask[:, 0]
        context = torch.bmm(scores.softmax(dim=-1), keys[..., :rank])
        return project(context.view(batch, -1), self.out, self.out_bias)


register_attention("mla", AttentionSpec(
    cache_layer=lambda config: DynamicLayer(),  # holds the latent as "keys" and the shared RoPE key as "values"
    rotary_dim=lambda config: config.qk_rope_head_dim,
    mask=causal_mask,
    decode_step=LatentAttentionStep,
    flops_per_token=lambda config, seq_len: (
        6 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * mean_causal_context(seq_len)
    ),
    validate=validate_latent_attention,
    transformers_export="deepseek_v3",
    no_export_reason=None,
))(MultiHeadLatentAttention)
