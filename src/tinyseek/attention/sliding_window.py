"""Sliding-window softmax attention (Mistral-style local attention): multi-head attention in which each token sees
only the ``sliding_window`` newest tokens up to itself. Its module, mask, decode step and registration are all here;
its one config field is ``TinySeekConfig.sliding_window``."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from tinyseek.attention.multi_head import MultiHeadAttention, MultiHeadAttentionStep, validate_multi_head_attention
from tinyseek.attention.registry import AttentionSpec, register_attention, same_document
from tinyseek.config import TinySeekConfig, require_positive
from tinyseek.decoding import Step


def validate_sliding_window_attention(config: TinySeekConfig) -> None:
    validate_multi_head_attention(config)
    require_positive(config, "sliding_window")


def mean_window_context(seq_len: int, window: int) -> float:
    """Keys a query sees on average when each sees at most `window` (those past the first window see all of it)."""
    return seq_len / 2 if seq_len <= window else window * (1 - window / (2 * seq_len))


def sliding_window_mask(config, padding_mask, q_len: int, past_len: int, device, document_ids=None) -> torch.Tensor:
    """Causal, and each query sees only the `sliding_window` newest keys up to itself (its own included), of its own
    document when documents are packed."""
    context_len = past_len + q_len
    query_positions = torch.arange(past_len, context_len, device=device)[:, None]
    key_positions = torch.arange(context_len, device=device)[None]
    in_window = ((key_positions <= query_positions) & (query_positions - key_positions < config.sliding_window))[None, None]
    if document_ids is not None:
        in_window = in_window & same_document(document_ids)
    mask = in_window
    if padding_mask is not None:  # left padding: real tokens are contiguous, so distances in the window still hold
        mask = mask & padding_mask[:, None, None, :context_len]
    # A left-padding query row sees no real key at all; letting it see its window avoids NaNs in rows nobody reads.
    return mask | (in_window & ~mask.any(dim=-1, keepdim=True))


class SlidingWindowAttention(MultiHeadAttention):
    """Multi-head attention under the sliding-window mask its spec declares; the forward is MHA's."""

    def __init__(self, config: TinySeekConfig):
        super().__init__(config)
        self.window = config.sliding_window


class SlidingWindowAttentionStep(MultiHeadAttentionStep):
    """MHA's step with the cache columns older than the window masked out. A row's real tokens are contiguous up to
    the column it writes (left-padded prompts, or a continuous batch's rows from column 0), so a column's distance
    from that row's column is its distance in tokens."""

    decodes = SlidingWindowAttention

    def __init__(self, module: SlidingWindowAttention, weights_dtype: torch.dtype | None = None):
        super().__init__(module, weights_dtype)
        self.window = module.window

    def attention_bias(self, step: Step) -> torch.Tensor:
        columns = torch.arange(step.length, device=step.column.device)
        too_old = columns <= step.column[:, None] - self.window  # [B, length]: each row from its own column
        bias = torch.zeros(too_old.shape, dtype=self.dtype, device=self.qkv.device).masked_fill(too_old, float("-inf"))
        bias = bias[:, None, None]
        return bias if step.mask is None else step.mask + bias


register_attention("sliding-window-mha", AttentionSpec(
    # Keeps every key: the mask hides the old ones. A cache bounded to the window would save memory, not compute.
    cache_layer=lambda config: DynamicLayer(),
    rotary_dim=lambda config: config.head_dim,
    mask=sliding_window_mask,
    decode_step=SlidingWindowAttentionStep,
    flops_per_token=lambda config, seq_len: (
        6 * config.num_attention_heads * 2 * config.head_dim * mean_window_context(seq_len, config.sliding_window)
    ),
    validate=validate_sliding_window_attention,
    transformers_export=None,
    no_export_reason="transformers' Llama has no sliding window (Mistral has one; tinyseek has no converter to it)",
))(SlidingWindowAttention)
