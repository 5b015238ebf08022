"""The TinySeek decoder: embedding, pre-norm blocks of attention and feed-forward, final norm, LM head.

A LLaMA-shaped model whose attention is linear, latent (MLA) or plain softmax, and whose feed-forward is
DeepSeekMoE or a dense SwiGLU MLP; optional multi-token prediction (DeepSeek-V3, section 2.2) adds D sequential
heads used only for the training loss. Module names follow transformers' DeepseekV3 and Llama, so weights move
between the three by name (see ``tinyseek.hf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from tinyseek.attention import TinySeekCache, attention_spec, document_positions
from tinyseek.config import TinySeekConfig
from tinyseek.errors import InputError
from tinyseek.layers import RMSNorm, RotaryEmbedding
from tinyseek.moe import DeepSeekMoE, RoutedExperts, Router, feed_forward_spec
from tinyseek.ops import (
    Embedding, Linear, StepMemory, linear_cross_entropy, linear_cross_entropy_with_z_loss, soft_capped,
)

IGNORE_INDEX = -100


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TinySeekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = attention_spec(config.attention_type).module(config)
        self.feed_forward_spec = feed_forward_spec(config.feed_forward_type(layer_idx))
        self.mlp = self.feed_forward_spec.build(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, rotary=None, causal_mask=None, padding_mask=None, cache_layer=None):
        """Returns the new hidden states and the layer's sequence-wise balance loss (or None)."""
        attended = self.self_attn(self.input_layernorm(hidden_states), rotary, causal_mask, padding_mask, cache_layer)
        hidden_states = hidden_states + attended
        output = self.mlp(self.post_attention_layernorm(hidden_states))
        feed_forward, balance_loss = output if self.feed_forward_spec.routes else (output, None)
        return hidden_states + feed_forward, balance_loss


@dataclass
class TinySeekModelOutput(BaseModelOutputWithPast):
    """Adds what the LM head and the losses need: the last hidden state before the final norm (the input of the
    multi-token-prediction modules) and the summed sequence-wise balance loss."""

    pre_norm_hidden_state: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


@dataclass
class TinySeekCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` is what to back-propagate; its parts are kept for logging."""

    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


class TinySeekPreTrainedModel(PreTrainedModel):
    config_class = TinySeekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Latent and recurrent states do not fit DynamicCache; the model makes its own TinySeekCache.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if self.config.zero_init_lm_head and module is getattr(self, "lm_head", None):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RoutedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        if isinstance(module, Router):  # a Linear too: its weight was drawn above
            init.zeros_(module.e_score_correction_bias)
        # Non-persistent buffers are not in checkpoints: from_pretrained builds them here, not in __init__.
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.inverse_frequencies())
        elif isinstance(module, DeepSeekMoE):
            init.zeros_(module.expert_counts)
            init.zeros_(module.last_expert_load)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, *, selective: bool = False, **kwargs
    ) -> None:
        """Checkpoint every decoder layer. ``selective=True`` keeps the outputs of matrix multiplies and attention
        (the costly part of the recompute) and recomputes only the cheap element-wise ops, whose outputs are most of
        the activation memory; gradients are the same either way."""
        # Non-reentrant checkpointing: it supports the layers' extra outputs and keyword arguments. Its default
        # determinism check compares every recomputed tensor's shape, dtype and device with the saved one's, in Python:
        # overhead that shows at 32-token micro-batches, for layers whose recomputed shapes never differ.
        checkpoint_kwargs = activation_checkpointing_kwargs or {"use_reentrant": False, "determinism_check": "none"}
        if selective:
            checkpoint_kwargs = {**checkpoint_kwargs, "context_fn": keep_matmul_outputs}
        super().activation_checkpointing_enable(checkpoint_kwargs, **kwargs)


SAVED_BY_SELECTIVE_CHECKPOINTING = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)
)


def keep_matmul_outputs():
    """torch.utils.checkpoint's selective-checkpoint contexts: save matmul and attention outputs, recompute the rest."""
    def policy(ctx, op, *args, **kwargs):
        if op in SAVED_BY_SELECTIVE_CHECKPOINTING:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class TinySeekModel(TinySeekPreTrainedModel):
    def __init__(self, config: TinySeekConfig):
        super().__init__(config)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = attention_spec(config.attention_type)
        dim = self.attention.rotary_dim(config)
        self.rotary_emb = RotaryEmbedding(dim, config.rope_theta) if dim else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TinySeekCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        document_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> TinySeekModelOutput:
        """``document_ids`` [B, T] (equal ids contiguous) packs several documents into each row: no token sees
        another document, and positions restart at each document's first token (see `tinyseek.attention`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        seq_len = hidden_states.shape[1]
        if use_cache and cache is None:
            cache = TinySeekCache(self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len + seq_len > self.config.max_position_embeddings:
            raise InputError(
                f"{past_len + seq_len} tokens exceed the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding_mask = attention_mask.bool()
        if document_ids is not None and (past_len or padding_mask is not None):
            raise InputError("document_ids pack whole documents: they take neither a cache nor padding")
        if position_ids is None:
            if document_ids is not None:
                position_ids = document_positions(document_ids)
            elif padding_mask is not None:  # left padding: real tokens count positions from 0
                position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_len, past_len + seq_len, device=hidden_states.device)[None]
        rotary = self.rotary_emb(position_ids) if self.rotary_emb is not None else None
        causal_mask = self.attention.mask(self.config, padding_mask, seq_len, past_len, hidden_states.device, document_ids)

        balance_loss = None
        for i, layer in enumerate(self.layers):
            cache_layer = cache.layers[i] if cache is not None else None
            hidden_states, layer_balance_loss = layer(
                hidden_states, rotary=rotary, causal_mask=causal_mask, padding_mask=padding_mask, cache_layer=cache_layer
            )
            if layer_balance_loss is not None:
                balance_loss = layer_balance_loss if balance_loss is None else balance_loss + layer_balance_loss
        return TinySeekModelOutput(
            last_hidden_state=self.norm(hidden_states),
            cache=cache,
            pre_norm_hidden_state=hidden_states,
            balance_loss=balance_loss,
        )


class MultiTokenPrediction(nn.Module):
    """One MTP depth: combine the previous depth's hidden state at position i with the embedding of token i + k,
    project, run one decoder block, normalise; the shared head then predicts token i + k + 1."""

    def __init__(self, config: TinySeekConfig, layer_idx: int):
        super().__init__()
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.projection = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, previous_hidden, future_embeddings, rotary, causal_mask=None, cache_layer=None):
        """The cache (speculative decoding's drafts) holds this block's own attention state over its positions."""
        combined = torch.cat((self.hidden_norm(previous_hidden), self.embedding_norm(future_embeddings)), dim=-1)
        hidden, balance_loss = self.block(
            self.projection(combined), rotary=rotary, causal_mask=causal_mask, cache_layer=cache_layer
        )
        return hidden, self.norm(hidden), balance_loss


class TinySeekForCausalLM(TinySeekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinySeekConfig):
        super().__init__(config)
        self.model = TinySeekModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        depths = range(config.num_nextn_predict_layers)
        self.mtp = nn.ModuleList(MultiTokenPrediction(config, config.num_hidden_layers + d) for d in depths) if depths else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TinySeekCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        step_memory: StepMemory | None = None,
        document_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> TinySeekCausalLMOutput:
        """``labels`` are the inputs' own ids (shifted inside, transformers' convention); ``shift_labels`` are the
        already aligned next-token targets, which keep the last position's target (what the trainer passes).
        ``step_memory``: the scratch buffers and accumulation window the fused loss reuses across training steps."""
        cache = kwargs.pop("past_key_values", cache)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, document_ids=document_ids,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        if labels is not None and shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        # Training with targets: the fused head + loss never materialises the B x T x vocab logits, which at the
        # seed's size cost more than the rest of the step (see tinyseek.ops); logits are then None.
        fused_loss = self.training and shift_labels is not None
        logits = None if fused_loss else self.head_logits(hidden_states)

        loss = lm_loss = mtp_loss = None
        if shift_labels is not None:
            if fused_loss and self.config.z_loss_coef:  # lm_loss is then the reported cross-entropy, no gradient
                loss, lm_loss = linear_cross_entropy_with_z_loss(
                    hidden_states, self.lm_head.weight, shift_labels, self.config.z_loss_coef, IGNORE_INDEX,
                    memory=step_memory, softcap=self.config.final_logit_softcapping,
                )
            else:
                loss = lm_loss = (self.lm_loss(hidden_states, shift_labels, step_memory) if fused_loss
                                  else cross_entropy(logits, shift_labels))
            if outputs.balance_loss is not None:
                loss = loss + outputs.balance_loss
            if self.mtp is not None and self.training:
                mtp_loss = self.multi_token_prediction_loss(
                    outputs.pre_norm_hidden_state, input_ids, shift_labels, document_ids, step_memory
                )
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        return TinySeekCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, lm_loss=lm_loss,
            balance_loss=outputs.balance_loss, mtp_loss=mtp_loss,
        )

    engine_generate: ClassVar[Callable | None] = None
    """`model.generate()` on tinyseek's generation engine: (model, inputs, generation_config, kwargs) -> the output,
    or None where the request needs transformers' loop. ``tinyseek.generate.engine`` sets it when it loads, which
    `import tinyseek` arranges as soon as this module has loaded (this module cannot import the engine, which is
    built on it)."""

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """Decoding runs on tinyseek's generation engine; what it does not do (beam search, custom processors or
        stopping criteria, streamers, scores in the output, ...) runs on transformers' own `generate()`, with a
        warning naming the field."""
        output = self.engine_generate(inputs, generation_config, kwargs) if self.engine_generate is not None else None
        return output if output is not None else super().generate(inputs, generation_config, **kwargs)

    def multi_token_prediction_loss(
        self, hidden, input_ids, shift_labels, document_ids=None, step_memory=None
    ) -> torch.Tensor:
        """Mean over depths k = 1..D of the cross-entropy of predicting token t + k + 1 at position t."""
        seq_len = hidden.shape[1]
        if document_ids is None:
            positions = torch.arange(seq_len, device=hidden.device)[None]
        else:
            positions = document_positions(document_ids)
        losses = []
        for depth, module in enumerate(self.mtp, start=1):
            if seq_len - depth < 1:
                break
            rotary = self.model.rotary_emb(positions[:, : seq_len - depth]) if self.model.rotary_emb is not None else None
            future = self.model.embed_tokens(input_ids[:, depth:])
            documents = document_ids[:, : seq_len - depth] if document_ids is not None else None
            mask = self.model.attention.mask(self.config, None, seq_len - depth, 0, hidden.device, documents)
            hidden, normed, balance_loss = module(hidden[:, : seq_len - depth], future, rotary, mask)
            depth_loss = self.lm_loss(normed, shift_labels[:, depth:], step_memory)
            losses.append(depth_loss if balance_loss is None else depth_loss + balance_loss)
        return torch.stack(losses).mean()

    def lm_loss(
        self, hidden_states: torch.Tensor, shift_labels: torch.Tensor, step_memory: StepMemory | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of the LM head on these (normalised) hidden states, fused and chunked."""
        return linear_cross_entropy(hidden_states, self.lm_head.weight, shift_labels, IGNORE_INDEX, memory=step_memory,
                                    softcap=self.config.final_logit_softcapping)

    def head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head's logits for these (normalised) hidden states, soft-capped where the config says so."""
        return soft_capped(self.lm_head(hidden_states), self.config.final_logit_softcapping)

    def moe_layers(self) -> list[nn.Module]:
        """The routing feed-forward modules, the MTP blocks' included."""
        return [layer.mlp for layer in self.modules() if isinstance(layer, DecoderLayer) and layer.feed_forward_spec.routes]

    def expert_load_counts(self) -> list[torch.Tensor]:
        """The live per-expert token counts of every MoE layer (to all-reduce across ranks before the update)."""
        return [moe.expert_counts for moe in self.moe_layers()]

    def update_load_balance_bias(self) -> None:
        """One auxiliary-loss-free balancing step per MoE layer; call once per optimizer step."""
        for moe in self.moe_layers():
            moe.update_load_balance_bias()

    def moe_metrics(self) -> dict:
        """MaxVio per MoE layer and its maximum, from the counts consumed by the last bias update."""
        per_layer = [moe.max_violation() for moe in self.moe_layers()]
        if not per_layer:
            return {}
        return {"maxvio": max(per_layer), "maxvio_per_layer": per_layer}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


# `import tinyseek` makes this module load as soon as transformers does, so this is enough for AutoConfig and
# AutoModelForCausalLM to load tinyseek folders.
AutoConfig.register(TinySeekConfig.model_type, TinySeekConfig, exist_ok=True)
AutoModelForCausalLM.register(TinySeekConfig, TinySeekForCausalLM, exist_ok=True)
