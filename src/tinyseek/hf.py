"""Conversion to and from transformers' own models where the architectures coincide.

TinySeek's module names follow transformers' DeepseekV3 and Llama, so a conversion is a config translation plus a
state-dict copy by name. Each attention type declares its twin (``AttentionSpec.transformers_export``, a key of
``TWINS``) or why it has none, and each feed-forward type which twins can express it
(``FeedForwardSpec.transformers_problem``): MLA with a sigmoid-scored MoE (or a dense MLP) is a
``DeepseekV3ForCausalLM``; MHA with a dense MLP is a ``LlamaForCausalLM``. Everything else is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel,
)

from tinyseek.attention import ATTENTION_REGISTRY, attention_spec
from tinyseek.config import TinySeekConfig
from tinyseek.errors import ConfigError
from tinyseek.modeling import TinySeekForCausalLM
from tinyseek.moe import feed_forward_spec

COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
)
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
MOE_FIELDS = (
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "norm_topk_prob",
    "routed_scaling_factor", "first_k_dense_replace",
)


@dataclass(frozen=True)
class TransformersTwin:
    """A transformers model family that some tinyseek architectures equal exactly."""

    model_class: type[PreTrainedModel]
    to_config: Callable[[TinySeekConfig, dict], PretrainedConfig]
    """The family's config, from the tinyseek config and the fields they share (COMMON_FIELDS and rope_parameters)."""
    from_config: Callable[[PretrainedConfig, dict, str], TinySeekConfig]
    """The tinyseek config, from the family's config, the shared fields and the attention type exported to it."""


def llama_config(config: TinySeekConfig, common: dict) -> LlamaConfig:
    return LlamaConfig(
        **common, num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, attention_bias=False,
        mlp_bias=False,
    )


def from_llama_config(hf_config: LlamaConfig, common: dict, attention_type: str) -> TinySeekConfig:
    if hf_config.attention_bias or hf_config.mlp_bias:
        raise ConfigError("Llama models with attention or MLP bias are not supported")
    if hf_config.head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
        raise ConfigError("Llama models whose head_dim differs from hidden_size / heads are not supported")
    return TinySeekConfig(
        **common, attention_type=attention_type, ffn_type="dense", num_key_value_heads=hf_config.num_key_value_heads
    )


def deepseek_v3_config(config: TinySeekConfig, common: dict) -> DeepseekV3Config:
    moe = {field: getattr(config, field) for field in MOE_FIELDS}
    if config.ffn_type == "dense":  # DeepseekV3 expresses "no MoE" as every layer being one of the first dense ones
        moe["first_k_dense_replace"] = config.num_hidden_layers
    return DeepseekV3Config(
        **common, **moe, **{field: getattr(config, field) for field in MLA_FIELDS},
        num_key_value_heads=config.num_attention_heads, n_group=1, topk_group=1, rope_interleave=False,
        attention_bias=False, num_nextn_predict_layers=0,
    )


def from_deepseek_v3_config(hf_config: DeepseekV3Config, common: dict, attention_type: str) -> TinySeekConfig:
    if hf_config.rope_interleave:
        raise ConfigError("interleaved RoPE (rope_interleave=True) is not supported; tinyseek uses the half-split layout")
    if (hf_config.n_group or 1) != (hf_config.topk_group or 1):
        raise ConfigError("group-limited routing (topk_group < n_group) is not supported")
    dense = hf_config.first_k_dense_replace >= hf_config.num_hidden_layers
    return TinySeekConfig(
        **common,
        **{field: getattr(hf_config, field) for field in MLA_FIELDS + MOE_FIELDS},
        attention_type=attention_type,
        ffn_type="dense" if dense else "moe",
        scoring_func="sigmoid",
    )


TWINS = {
    "llama": TransformersTwin(LlamaForCausalLM, llama_config, from_llama_config),
    "deepseek_v3": TransformersTwin(DeepseekV3ForCausalLM, deepseek_v3_config, from_deepseek_v3_config),
}


def transformers_twin_problem(config: TinySeekConfig) -> str | None:
    """Why this architecture has no transformers equivalent, or None when it has one."""
    if config.num_nextn_predict_layers:
        return "multi-token-prediction modules have no counterpart in transformers' forward pass"
    if config.attention_bias:
        return "attention projections with bias are not supported by the conversion"
    if config.final_logit_softcapping is not None:
        return "transformers' DeepseekV3 and Llama have no final logit soft-capping (final_logit_softcapping)"
    attention = attention_spec(config.attention_type)
    if attention.transformers_export is None:
        return attention.no_export_reason
    return feed_forward_spec(config.ffn_type).transformers_problem(config, attention.transformers_export)


def to_transformers_config(config: TinySeekConfig) -> PretrainedConfig:
    problem = transformers_twin_problem(config)
    if problem is not None:
        raise ConfigError(f"cannot convert this {config.attention_type}/{config.ffn_type} model to transformers: {problem}")
    common = {field: getattr(config, field) for field in COMMON_FIELDS}
    common["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    return TWINS[attention_spec(config.attention_type).transformers_export].to_config(config, common)


def to_transformers(model: TinySeekForCausalLM) -> PreTrainedModel:
    """The equivalent transformers model, with the same weights (copied), in the same dtype."""
    hf_config = to_transformers_config(model.config)
    hf_model = TWINS[hf_config.model_type].model_class(hf_config).to(dtype=model.dtype)
    copy_weights(model.state_dict(), hf_model)
    return hf_model.eval() if not model.training else hf_model


def from_transformers(hf_model: PreTrainedModel) -> TinySeekForCausalLM:
    """A TinySeek model with the weights of a transformers DeepseekV3 or Llama causal LM."""
    config = from_transformers_config(hf_model.config)
    model = TinySeekForCausalLM(config).to(dtype=hf_model.dtype)
    copy_weights(hf_model.state_dict(), model)
    return model.eval() if not hf_model.training else model


def from_transformers_config(hf_config) -> TinySeekConfig:
    attention_types = [name for name, spec in ATTENTION_REGISTRY.items() if spec.transformers_export == hf_config.model_type]
    if not attention_types:
        raise ConfigError(f"no conversion from model type {hf_config.model_type!r}; expected one of {tuple(TWINS)}")
    rope = hf_config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported; tinyseek uses plain RoPE")
    common = {field: getattr(hf_config, field) for field in COMMON_FIELDS}
    common["rope_theta"] = rope.get("rope_theta", 10000.0)
    return TWINS[hf_config.model_type].from_config(hf_config, common, attention_types[0])


def copy_weights(source: dict[str, torch.Tensor], target: torch.nn.Module) -> None:
    """Copy tensors by name; names missing on one side must be empty tensors (a shared expert of width 0)."""
    missing, unexpected = target.load_state_dict(source, strict=False)
    target_state = target.state_dict()
    problems = [name for name in missing if target_state[name].numel()] + [n for n in unexpected if source[n].numel()]
    if problems:
        raise ConfigError(f"weights do not correspond: {sorted(problems)[:8]}")
