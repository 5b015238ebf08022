"""The registry that declares every attention type, the masks, and the cache each type decodes from.

Each type lives in its own module of this package (`latent`, `linear`, `multi_head`, `sliding_window`): the module,
its single-token decode step, its cache layer and its ``@register_attention(name, AttentionSpec(...))``. The spec
states everything the rest of tinyseek needs to know about the type, so the model, the cache, the lean decoder,
speculative decoding, the FLOP count and the export read the spec instead of branching on the type's name.

Every attention module is called as ``attn(x, rotary, causal_mask, padding_mask, cache_layer)``:
  x            [B, T, hidden] the new tokens' (normalised) hidden states
  rotary       (cos, sin) for the new tokens' positions, or None for attention without RoPE
  causal_mask  what the type's ``AttentionSpec.mask`` returns: for softmax types a [B, 1, T, S] bool mask (True = may
               attend) or None, meaning plain causal over new tokens; linear attention takes the document ids
  padding_mask [B, S] bool over all S = past + T tokens (True = real token) or None
  cache_layer  this layer's entry of a ``TinySeekCache``, updated in place, or None

Packed documents: a training window may hold several documents side by side (``document_ids`` [B, T], equal ids
contiguous, given to the model's forward). No token attends across a boundary: softmax types see a block-diagonal
causal mask, linear attention restarts its state, and positions restart at 0 (the model computes them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from tinyseek.config import ARCHITECTURE_CHECKS, TinySeekConfig, registered
from tinyseek.errors import ConfigError


@dataclass(frozen=True)
class AttentionSpec:
    """What the model, the cache, the decoders, the FLOP count and the export need to know about one attention type.

    Every field without a default is required, so a new type states each of these rather than inheriting a default
    that is wrong for it. Exactly one of ``transformers_export`` and ``no_export_reason`` is set.
    """

    cache_layer: Callable[[TinySeekConfig], CacheLayerMixin]
    """A fresh decoding-cache entry for one layer. It either can drop its newest tokens (``crop(-n)``, as transformers'
    ``DynamicLayer``) or save and restore its whole state (``snapshot()``, ``restore(saved)``); speculative decoding
    asks the cache which (`TinySeekCache.can_crop`)."""
    rotary_dim: Callable[[TinySeekConfig], int | None]
    """The dimension the module applies RoPE to, or None when it takes no rotary embedding."""
    mask: Callable[..., torch.Tensor | None]
    """``mask(config, padding_mask, q_len, past_len, device, document_ids)``: what the module receives as
    ``causal_mask``. With ``document_ids`` [B, T] (packed documents, no past) it keeps every document to itself."""
    decode_step: type | None
    """The single-token decode step (`tinyseek.decoding`), built once from a module whose class is its ``decodes``;
    None where the type decodes through the model's own forward."""
    flops_per_token: Callable[[TinySeekConfig, int], float]
    """Training FLOPs (forward and backward) per token of one layer's attention, besides its weight matmuls, at a
    given sequence length."""
    validate: Callable[[TinySeekConfig], None]
    """Raise ConfigError naming the field when the config's fields for this type are inconsistent."""
    transformers_export: str | None
    """The transformers ``model_type`` this attention converts to (a key of ``tinyseek.hf.TWINS``), or None."""
    no_export_reason: str | None
    """Why there is no transformers twin, when there is none."""
    parent_decode_step_is_valid: bool = False
    """Set by a subclass of another type's module that decodes exactly as its parent: only then may ``decode_step``
    be the parent's."""
    module: type[nn.Module] | None = None
    """Filled in by ``register_attention``."""

    def __post_init__(self):
        if (self.transformers_export is None) == (self.no_export_reason is None):
            raise TypeError("an AttentionSpec names either its transformers_export target or its no_export_reason")

    def __reduce__(self):
        # Its fields are functions, lambdas among them: a model's spec crosses to another process (a server's
        # generation process) as the name it is registered under.
        return attention_spec, (next(name for name, spec in ATTENTION_REGISTRY.items() if spec is self),)


ATTENTION_REGISTRY: dict[str, AttentionSpec] = {}


def register_attention(name: str, spec: AttentionSpec | None = None):
    """Class decorator: make `name` a valid ``attention_type`` built by the decorated module, declared by `spec`."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(
            f"attention type {name!r} is registered without an AttentionSpec (got {spec!r}); declare its cache layer, "
            "rotary dimension, mask, decode step, FLOPs per token, config validation and transformers export target"
        )
    if name in ATTENTION_REGISTRY:
        raise TypeError(f"attention type {name!r} is already registered by {ATTENTION_REGISTRY[name].module.__name__}")

    def register(module: type[nn.Module]) -> type[nn.Module]:
        check_decode_step(name, spec, module)
        ATTENTION_REGISTRY[name] = replace(spec, module=module)
        return module

    return register


def check_decode_step(name: str, spec: AttentionSpec, module: type[nn.Module]) -> None:
    """A subclass must not decode with its parent's step by accident: the parent's step ignores whatever the
    subclass changed (a window, say), and its text would silently differ from the model's forward."""
    if spec.decode_step is None or spec.decode_step.decodes is module:
        return
    if not issubclass(module, spec.decode_step.decodes):
        raise TypeError(f"attention type {name!r}: {spec.decode_step.__name__} decodes {spec.decode_step.decodes.__name__}, not {module.__name__}")
    if not spec.parent_decode_step_is_valid:
        raise TypeError(
            f"attention type {name!r}: {module.__name__} would decode with its parent's {spec.decode_step.__name__}; "
            "declare its own decode step, or set parent_decode_step_is_valid=True if the parent's computes the same"
        )


def attention_spec(name: str) -> AttentionSpec:
    return registered(ATTENTION_REGISTRY, "attention_type", "attention type", name)


def validate_attention(config: TinySeekConfig) -> None:
    attention_spec(config.attention_type).validate(config)


ARCHITECTURE_CHECKS.append(validate_attention)


def causal_mask(config, padding_mask, q_len: int, past_len: int, device, document_ids=None) -> torch.Tensor | None:
    mask = build_causal_mask(padding_mask, q_len, past_len, device)
    if document_ids is None:
        return mask
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    return same_document(document_ids) & (causal if mask is None else mask)


def same_document(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T]: whether query t and key s belong to the same packed document."""
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] each token's position inside its own document: 0 at every document's first token."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def require_whole_heads(config: TinySeekConfig) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"hidden_size: {config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
        )


def mean_causal_context(seq_len: int) -> float:
    """Keys a query sees on average under a causal mask (half the score matrix is computed)."""
    return seq_len / 2


class TinySeekCache(Cache):
    """One entry per decoder layer, of the kind the attention type declares (`AttentionSpec.cache_layer`)."""

    def __init__(self, config: TinySeekConfig, num_layers: int | None = None):
        make_layer = attention_spec(config.attention_type).cache_layer
        layers = [make_layer(config) for _ in range(config.num_hidden_layers if num_layers is None else num_layers)]
        for layer in layers:
            if not (hasattr(layer, "crop") or hasattr(layer, "snapshot") and hasattr(layer, "restore")):
                raise TypeError(f"{type(layer).__name__}: a cache layer can either crop(-n) or snapshot() and restore()")
        super().__init__(layers=layers)

    @property
    def can_crop(self) -> bool:
        """Whether every layer can drop its newest tokens; otherwise each layer saves and restores its state."""
        return all(hasattr(layer, "crop") for layer in self.layers)

    def snapshot(self) -> list:
        return [layer.snapshot() for layer in self.layers]

    def restore(self, saved: list) -> None:
        for layer, state in zip(self.layers, saved):
            layer.restore(state)


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
