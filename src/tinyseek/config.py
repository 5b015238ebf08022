"""The one configuration object of the model: every architectural choice, validated on construction."""

from __future__ import annotations

from collections.abc import Callable

from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig

from tinyseek.errors import ConfigError

TYPE_SPECIFIC_SIZES = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                       "num_key_value_heads", "linear_attention_chunk_size", "moe_intermediate_size", "n_routed_experts",
                       "n_shared_experts", "num_experts_per_tok")
GATE_ACTIVATIONS = ("silu", "relu2")
"""The activations of the feed-forward blocks' gates (``hidden_act``, transformers' ``ACT2FN`` names): SiLU, as in
DeepSeek and LLaMA (SwiGLU), or ReLU squared, the GPT-2 speedrun's activation, here as a gate (transformers' twins
express both; llama.cpp's graphs only SiLU)."""
ARCHITECTURE_CHECKS: list[Callable[["TinySeekConfig"], None]] = []
"""The checks that belong to a registered type: the attention and feed-forward registries (built from this config,
so this module cannot import them) each add one when they load, which `import tinyseek` arranges as soon as this
module has loaded. Each raises ConfigError naming the field."""


class TinySeekConfig(PretrainedConfig):
    """Architecture of a TinySeek decoder.

    Attention is any registered type (``tinyseek.attention.ATTENTION_REGISTRY``): ``"linear"`` (causal ELU+1 linear
    attention), ``"mla"`` (DeepSeek's multi-head latent attention), ``"mha"`` (softmax attention with optional
    grouped-query heads) and the others registered there. The feed-forward block is any registered type
    (``tinyseek.moe.FEED_FORWARD_REGISTRY``): DeepSeekMoE (``"moe"``: shared plus fine-grained routed SwiGLU experts)
    or a dense SwiGLU MLP (``"dense"``); the first ``first_k_dense_replace`` layers are dense whatever the type.
    Invalid combinations raise ``ValueError`` naming the field at fault.
    """

    model_type = "tinyseek"
    keys_to_ignore_at_inference = ["cache"]
    TRAINING_KNOBS = (
        "attention_dropout", "mtp_loss_weight", "seq_aux_loss_coef", "bias_update_speed",
        "linear_attention_chunk_size", "initializer_range", "z_loss_coef", "zero_init_lm_head",
    )
    """Fields that change how the weights are trained (or, for the chunk size, only how fast the same function is
    computed), not their shapes or the function they compute: a run may resume with other values. Every other field
    is architecture and must match the checkpoint's."""

    def __init__(
        self,
        vocab_size: int = 32256,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        max_position_embeddings: int = 512,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        attention_type: str = "mla",
        attention_dropout: float = 0.0,
        attention_bias: bool = False,
        linear_attention_chunk_size: int = 64,
        q_lora_rank: int | None = None,
        kv_lora_rank: int = 32,
        qk_nope_head_dim: int = 32,
        qk_rope_head_dim: int = 16,
        v_head_dim: int = 32,
        num_key_value_heads: int | None = None,
        sliding_window: int = 256,
        ffn_type: str = "moe",
        hidden_act: str = "silu",
        intermediate_size: int = 256,
        moe_intermediate_size: int = 256,
        n_routed_experts: int = 4,
        n_shared_experts: int = 0,
        num_experts_per_tok: int = 2,
        scoring_func: str = "softmax",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        first_k_dense_replace: int = 0,
        bias_update_speed: float = 1e-3,
        seq_aux_loss_coef: float = 0.0,
        router_bias: bool = False,
        num_nextn_predict_layers: int = 0,
        mtp_loss_weight: float = 0.3,
        z_loss_coef: float = 0.0,
        zero_init_lm_head: bool = False,
        final_logit_softcapping: float | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.attention_type = attention_type
        self.attention_dropout = attention_dropout
        self.attention_bias = attention_bias
        self.linear_attention_chunk_size = linear_attention_chunk_size
        self.q_lora_rank = q_lora_rank or None
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.sliding_window = sliding_window
        self.ffn_type = ffn_type
        self.hidden_act = hidden_act
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.bias_update_speed = bias_update_speed
        self.seq_aux_loss_coef = seq_aux_loss_coef
        self.router_bias = router_bias
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.mtp_loss_weight = mtp_loss_weight
        # Two training levers of the GPT-2 speedrun: a z-loss on the LM head's log-partition (the trained function
        # is unchanged, so exports are too) and an untied head that starts at zero (every first prediction uniform).
        self.z_loss_coef = z_loss_coef
        self.zero_init_lm_head = zero_init_lm_head
        # The speedrun's logit soft-cap, c * tanh(logits / c) (Gemma 2's name for it). Unlike the two above it changes
        # the function, which transformers' DeepseekV3 and Llama cannot compute, so a model with it does not export.
        self.final_logit_softcapping = final_logit_softcapping
        try:
            super().__init__(
                tie_word_embeddings=tie_word_embeddings,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                **kwargs,
            )
        except StrictDataclassError as error:
            # transformers validates the generic fields first and wraps what it trips over (a string for a size);
            # this class's own check names the field, else the wrapped reason is still a ValueError.
            self.validate_architecture()
            raise ValueError(str(error).replace("\n", " ")) from None
        self.validate_architecture()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def feed_forward_type(self, layer_idx: int) -> str:
        """The layer's feed-forward type: ``ffn_type``, except the first ``first_k_dense_replace`` layers (DeepSeek-V3's
        dense first layers)."""
        return self.ffn_type if layer_idx >= self.first_k_dense_replace else "dense"

    def validate_architecture(self) -> None:
        def fail(field: str, reason: str):
            raise ConfigError(f"{field}: {reason}")

        require_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "max_position_embeddings")
        # Sizes of parts the chosen types do not build are still sizes: a negative one is a typo waiting to matter.
        require_non_negative(self, *(name for name in TYPE_SPECIFIC_SIZES if getattr(self, name) is not None))
        if not 0.0 <= self.attention_dropout < 1.0:
            fail("attention_dropout", f"must be in [0, 1), got {self.attention_dropout}")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta}")
        require_positive(self, "intermediate_size")
        if self.hidden_act not in GATE_ACTIVATIONS:
            fail("hidden_act", f"unknown gate activation {self.hidden_act!r}; choose one of {tuple(GATE_ACTIVATIONS)}")
        require_non_negative(self, "first_k_dense_replace", "num_nextn_predict_layers")
        if self.mtp_loss_weight < 0:
            fail("mtp_loss_weight", f"must be non-negative, got {self.mtp_loss_weight}")
        if self.z_loss_coef < 0:
            fail("z_loss_coef", f"must be non-negative, got {self.z_loss_coef}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            fail("final_logit_softcapping", f"must be positive (or None for no cap), got {self.final_logit_softcapping}")
        if self.zero_init_lm_head and self.tie_word_embeddings:
            fail("zero_init_lm_head", "a tied head is the embedding, which must not start at zero; untie it "
                                      "(tie_word_embeddings=False) or leave the head's initialisation alone")
        for check in ARCHITECTURE_CHECKS:
            check(self)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TinySeekConfig":
        """Build a named preset (see ``PRESETS``), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def registered(registry: dict, field: str, kind: str, name: str):
    """``registry[name]``, or a ConfigError naming the config field and what is registered."""
    if name not in registry:
        raise ConfigError(f"{field}: unknown {kind} {name!r}; choose one of {tuple(registry)}")
    return registry[name]


def require_positive(config: TinySeekConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{field}: must be a positive integer, got {value!r}")


def require_non_negative(config: TinySeekConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{field}: must be a non-negative integer, got {value!r}")


SEED = dict(
    attention_type="linear",
    attention_dropout=0.1,
    ffn_type="moe",
    intermediate_size=256,
    moe_intermediate_size=256,
    n_routed_experts=4,
    n_shared_experts=0,
    num_experts_per_tok=2,
    scoring_func="softmax",
    norm_topk_prob=True,
    router_bias=True,
    bias_update_speed=1e-3,
    seq_aux_loss_coef=0.0,
)
"""The seed model: 10,095,760 parameters.

Linear attention (dropout 0.1) with bias-free 128x128 q/k/v/o projections, a 4-expert MoE in every layer with a
``Linear(128, 4)`` router that has a learnable bias, no shared expert, untied head.

Top-k is 2: with four experts, k=1 would make renormalised gate weights all 1.0 (no router gradient) and k=4 is a
dense layer at four times the cost; k=2 is the natural reading of the seed and the Mixtral choice. Softmax scoring
keeps the seed's router semantics (a probability over experts). Load balancing is DeepSeek-V3's auxiliary-loss-free
per-expert bias at the paper's speed 1e-3, updated once per optimizer step; the sequence-wise balance loss is off
because the bias alone keeps MaxVio low (see ``benchmarks/quality.py``) and it adds a gradient that competes with
the language-modelling loss.
"""

DEEPSEEK_V3_TINY = dict(
    attention_type="mla",
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    ffn_type="moe",
    intermediate_size=512,
    moe_intermediate_size=64,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    bias_update_speed=1e-3,
    seq_aux_loss_coef=1e-4,
)
"""DeepSeek-V3 at the seed's width: MLA (compressed queries and keys/values, decoupled RoPE), one shared plus 16
fine-grained routed experts of width 64 with top-4 sigmoid routing, bias-based balancing plus the tiny sequence-wise
loss of the paper, first layer dense. Active FFN width per token is 1 shared + 4 routed x 64 = 320."""

LLAMA_TINY = dict(
    attention_type="mha",
    ffn_type="dense",
    intermediate_size=320,
)
"""A dense LLaMA-style baseline: softmax attention with RoPE and a SwiGLU MLP of width 320, the same active FFN
width per token as ``deepseek-v3-tiny``."""

PRESETS: dict[str, dict] = {"seed": SEED, "deepseek-v3-tiny": DEEPSEEK_V3_TINY, "llama-tiny": LLAMA_TINY}
