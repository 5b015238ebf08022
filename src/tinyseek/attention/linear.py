"""Causal linear attention (ELU + 1 feature map): the module, its chunked and recurrent forms, its O(1) state and
its decode step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from tinyseek.attention.registry import AttentionSpec, register_attention, require_whole_heads
from tinyseek.config import TinySeekConfig, require_positive
from tinyseek.decoding import Step, joined_bias, project, transposed
# A drop-in nn.Linear whose bf16-autocast matmuls avoid torch's slow CPU fallback (see tinyseek.ops).
from tinyseek.ops import Linear, fused_linear

# Keeps the linear-attention normaliser away from zero for rows that have seen only padding.
LINEAR_ATTENTION_EPS = 1e-6


def document_ids_only(config, padding_mask, q_len: int, past_len: int, device, document_ids=None):
    """Linear attention applies causality and padding itself; of the packed documents it needs their ids, to
    restart its state at each boundary."""
    return document_ids


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

    def snapshot(self) -> tuple:
        """The state as it is now; a recurrent state cannot drop its newest tokens, so it is restored instead."""
        return self.state, self.normalizer, self.seen_tokens, self.is_initialized

    def restore(self, saved: tuple) -> None:
        self.state, self.normalizer, self.seen_tokens, self.is_initialized = saved

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))
            self.normalizer = self.normalizer.index_select(0, beam_idx.to(self.normalizer.device))

    def reset(self) -> None:
        self.state = self.normalizer = None
        self.seen_tokens = 0
        self.is_initialized = False



def validate_linear_attention(config: TinySeekConfig) -> None:
    require_whole_heads(config)
    require_positive(config, "linear_attention_chunk_size")


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
                output, state, normalizer = chunked_linear_attention(
                    query, key, value, self.chunk_size, initial, document_ids=causal_mask
                )
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


def chunked_linear_attention(query, key, value, chunk_size: int, initial=None, document_ids=None):
    """Causal linear attention over [B, H, T, d] in chunks: exact softmax-free attention inside each chunk, and the
    running state (an exclusive prefix sum over chunks) for everything before it. Returns (out, S, z).

    With ``document_ids`` [B, T] (packed documents, no initial state) the state restarts at every boundary: a query
    sees only the keys of its own document, inside its chunk and in the chunks before it."""
    batch, heads, seq_len, dim = query.shape
    chunk = min(chunk_size, seq_len)
    padded_len = -(-seq_len // chunk) * chunk
    if padded_len != seq_len:  # zero keys add nothing to the state; the padded query rows are dropped below
        pad = (0, 0, 0, padded_len - seq_len)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
        if document_ids is not None:
            document_ids = F.pad(document_ids, (0, padded_len - seq_len), mode="replicate")
    num_chunks = padded_len // chunk
    q, k, v = (t.view(batch, heads, num_chunks, chunk, -1) for t in (query, key, value))

    within = (q @ k.transpose(-1, -2)).tril()  # [B, H, N, C, C], causal inside the chunk
    if document_ids is None:
        chunk_states = k.transpose(-1, -2) @ v  # [B, H, N, d, dv]
        chunk_normalizers = k.sum(dim=-2)  # [B, H, N, d]
        states_before = chunk_states.cumsum(dim=2) - chunk_states
        normalizers_before = chunk_normalizers.cumsum(dim=2) - chunk_normalizers
        if initial is not None:
            states_before = states_before + initial[0][:, :, None]
            normalizers_before = normalizers_before + initial[1][:, :, None]
        final_state = states_before[:, :, -1] + chunk_states[:, :, -1]
        final_normalizer = normalizers_before[:, :, -1] + chunk_normalizers[:, :, -1]
    else:
        documents = document_ids.view(batch, 1, num_chunks, chunk)
        within = within * (documents[..., :, None] == documents[..., None, :])
        states_before, normalizers_before, final_state, final_normalizer = document_states_before(k, v, documents)
        q = q * (documents == documents[..., :1])[..., None]  # a document that starts inside a chunk has no state yet
    numerator = within @ v + q @ states_before
    denominator = within.sum(-1) + (q * normalizers_before[..., None, :]).sum(-1) + LINEAR_ATTENTION_EPS
    output = (numerator / denominator[..., None]).view(batch, heads, padded_len, -1)[:, :, :seq_len]
    return output, final_state, final_normalizer


def document_states_before(k, v, documents):
    """(S, z) entering each chunk from the chunks before it, for the document the chunk starts with only; and the
    final state, the last document's. Documents are contiguous, so the keys of the document a chunk starts with that
    came earlier are the tail of the chunk before it plus what that chunk itself carried in, if it started in the
    same document."""
    first = documents[..., 0]  # [B, 1, N]
    state = k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    normalizer = k.new_zeros(*k.shape[:2], k.shape[-1])
    states, normalizers = [], []
    for index in range(k.shape[2]):
        states.append(state)
        normalizers.append(normalizer)
        following = first[..., index + 1] if index + 1 < k.shape[2] else documents[..., -1, -1]  # [B, 1]
        carried = (first[..., index] == following)[..., None]
        tail = k[:, :, index] * (documents[:, :, index] == following[..., None])[..., None]
        state = state * carried[..., None] + tail.transpose(-1, -2) @ v[:, :, index]
        normalizer = normalizer * carried + tail.sum(dim=-2)
    return torch.stack(states, dim=2), torch.stack(normalizers, dim=2), state, normalizer


class LinearAttentionStep:
    """S and z as one state [B * heads, d, d + 1]: the value projection gains, per head, a column with weight 0 and
    bias 1, so phi(k) [v | 1]^T adds phi(k) v^T to S and phi(k) to z at once, and phi(q) [S | z] gives both the
    numerator and the denominator."""

    decodes = LinearAttention

    def __init__(self, module: LinearAttention, weights_dtype: torch.dtype | None = None):
        heads, dim = module.num_heads, module.head_dim
        self.dtype = module.q_proj.weight.dtype
        self.heads, self.dim = heads, dim
        hidden = module.q_proj.weight.shape[1]
        value = module.v_proj.weight.detach().view(heads, dim, hidden)
        value = torch.cat((value, value.new_zeros(heads, 1, hidden)), dim=1).flatten(0, 1)
        self.qkv = transposed(module.q_proj.weight, module.k_proj.weight, value, dtype=weights_dtype)
        zeros = value.new_zeros(heads * dim)
        biases = [p.bias.detach() if p.bias is not None else zeros for p in (module.q_proj, module.k_proj, module.v_proj)]
        value_bias = torch.cat((biases[2].view(heads, dim), zeros.new_ones(heads, 1)), dim=1).flatten()
        self.qkv_bias = torch.cat((biases[0], biases[1], value_bias))
        self.out, self.out_bias = transposed(module.o_proj.weight, dtype=weights_dtype), joined_bias([module.o_proj])

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        return self.qkv.new_zeros(batch * self.heads, self.dim, self.dim + 1, dtype=self.dtype)

    def load(self, cache, cache_layer, length: int) -> None:
        state = cache.view(-1, self.heads, self.dim, self.dim + 1)
        state[..., : self.dim] = cache_layer.state
        state[..., self.dim] = cache_layer.normalizer

    def __call__(self, x: torch.Tensor, step: Step, cache, rotary) -> torch.Tensor:
        batch, heads, dim = x.shape[0], self.heads, self.dim
        qkv = project(x, self.qkv, self.qkv_bias)
        features = F.elu(qkv[:, : 2 * heads * dim]) + 1
        query, key = features.view(batch, 2, heads * dim).unbind(1)
        value = qkv[:, 2 * heads * dim :].reshape(batch * heads, 1, dim + 1)
        cache.baddbmm_(key.reshape(batch * heads, dim, 1), value)
        read = torch.bmm(query.reshape(batch * heads, 1, dim), cache).view(batch, heads, dim + 1)
        output = read[..., :dim] / (read[..., dim:] + LINEAR_ATTENTION_EPS)
        return project(output.view(batch, -1), self.out, self.out_bias)


register_attention("linear", AttentionSpec(
    cache_layer=lambda config: LinearAttentionState(),
    rotary_dim=lambda config: None,
    mask=document_ids_only,
    decode_step=LinearAttentionStep,
    # The state update and the query against the state: 2 * d_k * d_v multiply-adds per head, forward.
    flops_per_token=lambda config, seq_len: 6 * config.num_attention_heads * 2 * config.head_dim * config.head_dim,
    validate=validate_linear_attention,
    transformers_export=None,
    no_export_reason="transformers has no ELU+1 causal linear attention model",
))(LinearAttention)
