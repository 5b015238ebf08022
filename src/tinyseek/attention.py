"""The attention mechanisms behind one interface, the cache each decodes from, and the registry that declares them.

Each type is registered with ``@register_attention(name, AttentionSpec(...))``: the spec states everything the rest of
tinyseek needs to know about it (its cache layer, RoPE dimension, mask, FLOPs per token, transformers export target),
so the model, the cache, the FLOP count and the export read the spec instead of branching on the type's name.

Every attention module is called as ``attn(x, rotary, causal_mask, padding_mask, cache_layer)``:
  x            [B, T, hidden] the new tokens' (normalised) hidden states
  rotary       (cos, sin) for the new tokens' positions, or None for attention without RoPE
  causal_mask  [B, 1, T, S] bool (True = may attend) or None, meaning plain causal over new tokens
  padding_mask [B, S] bool over all S = past + T tokens (True = real token) or None
  cache_layer  this layer's entry of a ``TinySeekCache``, updated in place, or None
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from tinyseek.config import TinySeekConfig, require_positive
from tinyseek.errors import ConfigError
from tinyseek.layers import RMSNorm, apply_rotary
# A drop-in nn.Linear whose bf16-autocast matmuls avoid torch's slow CPU fallback (see tinyseek.ops).
from tinyseek.ops import Linear, fused_linear, scaled_dot_product_attention

# DeepSeek's reference normalises the compressed latents with a fixed epsilon, whatever the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6
# Keeps the linear-attention normaliser away from zero for rows that have seen only padding.
LINEAR_ATTENTION_EPS = 1e-6



@dataclass(frozen=True)
class AttentionSpec:
    """What the model, the cache, the FLOP count and the export need to know about one attention type.

    Every field is required, so a new type states each of these rather than inheriting a default that is wrong
    for it. Exactly one of ``transformers_export`` and ``no_export_reason`` is set.
    """

    cache_layer: Callable[[TinySeekConfig], CacheLayerMixin]
    """A fresh decoding-cache entry for one layer."""
    rotary_dim: Callable[[TinySeekConfig], int | None]
    """The dimension the module applies RoPE to, or None when it takes no rotary embedding."""
    mask: Callable[..., torch.Tensor | None]
    """``mask(config, padding_mask, q_len, past_len, device)``: what the module receives as ``causal_mask``."""
    flops_per_token: Callable[[TinySeekConfig, int], float]
    """Training FLOPs (forward and backward) per token of one layer's attention, besides its weight matmuls, at a
    given sequence length."""
    validate: Callable[[TinySeekConfig], None]
    """Raise ConfigError naming the field when the config's fields for this type are inconsistent."""
    transformers_export: str | None
    """The transformers ``model_type`` this attention converts to (a key of ``tinyseek.hf.TWINS``), or None."""
    no_export_reason: str | None
    """Why there is no transformers twin, when there is none."""
    module: type[nn.Module] | None = None
    """Filled in by ``register_attention``."""

    def __post_init__(self):
        if (self.transformers_export is None) == (self.no_export_reason is None):
            raise TypeError("an AttentionSpec names either its transformers_export target or its no_export_reason")


ATTENTION_REGISTRY: dict[str, AttentionSpec] = {}


def register_attention(name: str, spec: AttentionSpec | None = None):
    """Class decorator: make `name` a valid ``attention_type`` built by the decorated module, declared by `spec`."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(
            f"attention type {name!r} is registered without an AttentionSpec (got {spec!r}); declare its cache layer, "
            "rotary dimension, mask, FLOPs per token, config validation and transformers export target"
        )
    if name in ATTENTION_REGISTRY:
        raise TypeError(f"attention type {name!r} is already registered by {ATTENTION_REGISTRY[name].module.__name__}")

    def register(module: type[nn.Module]) -> type[nn.Module]:
        ATTENTION_REGISTRY[name] = replace(spec, module=module)
        return module

    return register


def attention_spec(name: str) -> AttentionSpec:
    if name not in ATTENTION_REGISTRY:
        raise ConfigError(f"attention_type: unknown attention type {name!r}; choose one of {tuple(ATTENTION_REGISTRY)}")
    return ATTENTION_REGISTRY[name]


def causal_mask(config, padding_mask, q_len: int, past_len: int, device) -> torch.Tensor | None:
    return build_causal_mask(padding_mask, q_len, past_len, device)


def no_mask(config, padding_mask, q_len: int, past_len: int, device) -> None:
    """For modules that apply causality and the padding mask themselves."""
    return None


def require_whole_heads(config: TinySeekConfig) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"hidden_size: {config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
        )


def mean_causal_context(seq_len: int) -> float:
    """Keys a query sees on average under a causal mask (half the score matrix is computed)."""
    return seq_len / 2


class LinearAttentionState(CacheLayerMixin):
    """The O(1) decoding state of causal linear attention: S = sum phi(k) v^T and z = sum phi(k), in fp32."""

    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.state: torch.Tensor | None = None
        self.normalizer: torch.Tensor | None = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:  # the state is created by the first update
        pass

    def update(self, state: torch.Tensor, normalizer: torch.Tensor, num_new_tokens: int):
        self.state, self.normalizer = state, normalizer
        self.seen_tokens += num_new_tokens
        self.is_initialized = True
        return state, normalizer

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))
            self.normalizer = self.normalizer.index_select(0, beam_idx.to(self.normalizer.device))

    def reset(self) -> None:
        self.state = self.normalizer = None
        self.seen_tokens = 0
        self.is_initialized = False


class TinySeekCache(Cache):
    """One entry per decoder layer, of the kind the attention type declares: keys/values for "mha"; the compressed
    latent c_kv and the shared RoPE key for "mla" (kv_lora_rank + qk_rope_head_dim numbers per token); the recurrent
    state for "linear"."""

    def __init__(self, config: TinySeekConfig):
        make_layer = attention_spec(config.attention_type).cache_layer
        super().__init__(layers=[make_layer(config) for _ in range(config.num_hidden_layers)])


def validate_linear_attention(config: TinySeekConfig) -> None:
    require_whole_heads(config)
    require_positive(config, "linear_attention_chunk_size")


@register_attention("linear", AttentionSpec(
    cache_layer=lambda config: LinearAttentionState(),
    rotary_dim=lambda config: None,
    mask=no_mask,
    # The state update and the query against the state: 2 * d_k * d_v multiply-adds per head, forward.
    flops_per_token=lambda config, seq_len: 6 * config.num_attention_heads * 2 * config.head_dim * config.head_dim,
    validate=validate_linear_attention,
    transformers_export=None,
    no_export_reason="transformers has no ELU+1 causal linear attention model",
))
class LinearAttention(nn.Module):
    """Causal linear attention with the feature map phi(x) = ELU(x) + 1 (Katharopoulos et al., 2020).

    out_t = phi(q_t) S_t / (phi(q_t) . z_t), with S_t = sum_{s<=t} phi(k_s) v_s^T and z_t = sum_{s<=t} phi(k_s).
    Training runs the chunked parallel form (memory O(T * chunk), not O(T^2)); decoding carries (S, z), so each new
    token costs the same whatever the context length. Dropout acts on the per-head attention output, the one place
    the parallel and the recurrent forms share.
    """

    def __init__(self, config: TinySeekConfig):
        super().__init__()
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.chunk_size = config.linear_attention_chunk_size
        self.q_proj = Linear(hidden, hidden, bias=bias)
        self.k_proj = Linear(hidden, hidden, bias=bias)
        self.v_proj = Linear(hidden, hidden, bias=bias)
        self.o_proj = Linear(hidden, hidden, bias=bias)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, x, rotary, causal_mask, padding_mask, cache_layer=None):
        batch, seq_len, _ = x.shape
        projections = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        heads = [p.reshape(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2) for p in projections]
        # The feature map and the normaliser run in fp32: ELU + 1 underflows to 0 in bf16 for large negative inputs.
        with torch.autocast(device_type=x.device.type, enabled=False):
            query, key, value = (F.elu(heads[0].float()) + 1, F.elu(heads[1].float()) + 1, heads[2].float())
            if padding_mask is not None:
                key = key * padding_mask[:, None, -seq_len:, None]
            initial = (cache_layer.state, cache_layer.normalizer) if cache_layer is not None and cache_layer.is_initialized else None
            if initial is not None and seq_len == 1:
                output, state, normalizer = recurrent_linear_attention_step(query, key, value, *initial)
            else:
                output, state, normalizer = chunked_linear_attention(query, key, value, self.chunk_size, initial)
        if cache_layer is not None:
            cache_layer.update(state, normalizer, seq_len)
        output = self.dropout(output.to(x.dtype))
        return self.o_proj(output.transpose(1, 2).reshape(batch, seq_len, -1))


def recurrent_linear_attention_step(query, key, value, state, normalizer):
    """One token: (S, z) += (phi(k) v^T, phi(k)); out = phi(q) S / (phi(q) . z). Shapes [B, H, 1, d]."""
    state = state + key.transpose(-1, -2) @ value
    normalizer = normalizer + key[:, :, 0]
    denominator = (query[:, :, 0] * normalizer).sum(-1)[..., None, None] + LINEAR_ATTENTION_EPS
    return (query @ state) / denominator, state, normalizer


def chunked_linear_attention(query, key, value, chunk_size: int, initial=None):
    """Causal linear attention over [B, H, T, d] in chunks: exact softmax-free attention inside each chunk, and the
    running state (an exclusive prefix sum over chunks) for everything before it. Returns (out, S, z)."""
    batch, heads, seq_len, dim = query.shape
    chunk = min(chunk_size, seq_len)
    padded_len = -(-seq_len // chunk) * chunk
    if padded_len != seq_len:  # zero keys add nothing to the state; the padded query rows are dropped below
        pad = (0, 0, 0, padded_len - seq_len)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    num_chunks = padded_len // chunk
    q, k, v = (t.view(batch, heads, num_chunks, chunk, -1) for t in (query, key, value))

    chunk_states = k.transpose(-1, -2) @ v  # [B, H, N, d, dv]
    chunk_normalizers = k.sum(dim=-2)  # [B, H, N, d]
    states_before = chunk_states.cumsum(dim=2) - chunk_states
    normalizers_before = chunk_normalizers.cumsum(dim=2) - chunk_normalizers
    if initial is not None:
        states_before = states_before + initial[0][:, :, None]
        normalizers_before = normalizers_before + initial[1][:, :, None]

    within = (q @ k.transpose(-1, -2)).tril()  # [B, H, N, C, C], causal inside the chunk
    numerator = within @ v + q @ states_before
    denominator = within.sum(-1) + (q * normalizers_before[..., None, :]).sum(-1) + LINEAR_ATTENTION_EPS
    output = (numerator / denominator[..., None]).view(batch, heads, padded_len, -1)[:, :, :seq_len]
    final_state = states_before[:, :, -1] + chunk_states[:, :, -1]
    final_normalizer = normalizers_before[:, :, -1] + chunk_normalizers[:, :, -1]
    return output, final_state, final_normalizer


def validate_latent_attention(config: TinySeekConfig) -> None:
    require_positive(config, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
    if not isinstance(config.qk_nope_head_dim, int) or config.qk_nope_head_dim < 0:
        raise ConfigError(f"qk_nope_head_dim: must be a non-negative integer, got {config.qk_nope_head_dim!r}")
    if config.q_lora_rank is not None:
        require_positive(config, "q_lora_rank")
    if config.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim: must be even for RoPE, got {config.qk_rope_head_dim}")


@register_attention("mla", AttentionSpec(
    cache_layer=lambda config: DynamicLayer(),  # holds the latent as "keys" and the shared RoPE key as "values"
    rotary_dim=lambda config: config.qk_rope_head_dim,
    mask=causal_mask,
    flops_per_token=lambda config, seq_len: (
        6 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * mean_causal_context(seq_len)
    ),
    validate=validate_latent_attention,
    transformers_export="deepseek_v3",
    no_export_reason=None,
))
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


@register_attention("mha", AttentionSpec(
    cache_layer=lambda config: DynamicLayer(),
    rotary_dim=lambda config: config.head_dim,
    mask=causal_mask,
    flops_per_token=lambda config, seq_len: 6 * config.num_attention_heads * 2 * config.head_dim * mean_causal_context(seq_len),
    validate=validate_multi_head_attention,
    transformers_export="llama",
    no_export_reason=None,
))
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



def validate_sliding_window_attention(config: TinySeekConfig) -> None:
    validate_multi_head_attention(config)
    require_positive(config, "sliding_window")


def mean_window_context(seq_len: int, window: int) -> float:
    """Keys a query sees on average when each sees at most `window` (those past the first window see all of it)."""
    return seq_len / 2 if seq_len <= window else window * (1 - window / (2 * seq_len))


def sliding_window_mask(config, padding_mask, q_len: int, past_len: int, device) -> torch.Tensor:
    """Causal, and each query sees only the `sliding_window` newest keys up to itself (its own included)."""
    context_len = past_len + q_len
    query_positions = torch.arange(past_len, context_len, device=device)[:, None]
    key_positions = torch.arange(context_len, device=device)[None]
    in_window = (key_positions <= query_positions) & (query_positions - key_positions < config.sliding_window)
    mask = in_window[None, None]
    if padding_mask is not None:  # left padding: real tokens are contiguous, so distances in the window still hold
        mask = mask & padding_mask[:, None, None, :context_len]
    # A left-padding query row sees no real key at all; letting it see its window avoids NaNs in rows nobody reads.
    return mask | (in_window[None, None] & ~mask.any(dim=-1, keepdim=True))


@register_attention("sliding-window-mha", AttentionSpec(
    # Keeps every key: the mask hides the old ones. A cache bounded to the window would save memory, not compute.
    cache_layer=lambda config: DynamicLayer(),
    rotary_dim=lambda config: config.head_dim,
    mask=sliding_window_mask,
    flops_per_token=lambda config, seq_len: (
        6 * config.num_attention_heads * 2 * config.head_dim * mean_window_context(seq_len, config.sliding_window)
    ),
    validate=validate_sliding_window_attention,
    transformers_export=None,
    no_export_reason="transformers' Llama has no sliding window (Mistral has one; tinyseek has no converter to it)",
))
class SlidingWindowAttention(MultiHeadAttention):
    """Multi-head attention in which each token attends to the last ``sliding_window`` tokens only (Mistral-style
    local attention); the window comes from the mask its spec declares, so the module is MHA's unchanged."""

def build_causal_mask(padding_mask: torch.Tensor | None, q_len: int, past_len: int, device) -> torch.Tensor | None:
    """[B or 1, 1, q_len, past_len + q_len] bool mask, or None where SDPA's own causal flag is exact (no padding,
    and either no past or a single new token)."""
    if padding_mask is None and (past_len == 0 or q_len == 1):
        return None
    context_len = past_len + q_len
    query_positions = torch.arange(past_len, context_len, device=device)[:, None]
    mask = (torch.arange(context_len, device=device)[None] <= query_positions)[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :context_len]
    # A left-padding query row sees no real key at all; letting it see everything avoids NaNs in rows nobody reads.
    return mask | ~mask.any(dim=-1, keepdim=True)
