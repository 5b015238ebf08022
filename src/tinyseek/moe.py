"""Feed-forward blocks, each a unit with its module, decode step and `FeedForwardSpec`: the dense SwiGLU MLP
(``"dense"``) and DeepSeekMoE (``"moe"``: shared plus fine-grained routed experts).

Routing follows DeepSeek-V3: experts are *selected* by score + a per-expert bias that the trainer nudges towards
balance once per optimizer step (auxiliary-loss-free balancing), while the *gating weights* come from the unbiased
scores. Parameter names and layouts match transformers' DeepseekV3 so that weights convert by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from tinyseek.config import ARCHITECTURE_CHECKS, TinySeekConfig, registered, require_non_negative, require_positive
from tinyseek.decoding import arranged, joined_bias, project, transposed
from tinyseek.errors import ConfigError
# A drop-in nn.Linear / F.linear whose bf16-autocast matmuls avoid torch's slow CPU fallback (see tinyseek.ops).
from tinyseek.ops import Linear, fused_linear, linear


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), the gate's activation named by ``hidden_act``: SiLU (SwiGLU) or ReLU squared."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.act = ACT2FN[hidden_act]
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act(gate) * up)


class Router(nn.Linear):
    """Scores every routed expert for every token and picks the top k.

    Kept in fp32 under autocast (as DeepSeek-V3 does): routing decisions are discrete, and bf16 rounding of nearly
    tied scores flips them from step to step.
    """

    def __init__(self, config: TinySeekConfig):
        super().__init__(config.hidden_size, config.n_routed_experts, bias=config.router_bias)
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts), persistent=True)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return SCORING_FUNCTIONS[self.scoring_func](logits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (expert indices [N, k], gating weights [N, k], scores [N, E]) for tokens x [N, H]."""
        scores = self.scores(x)
        return (*choose_experts(scores, self), scores)


SCORING_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
}


def choose_experts(scores: torch.Tensor, router: Router) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices [N, k], gating weights [N, k]) from the scores [N, E]: the routing rule, which the model's
    forward and the decode step both call. ``router`` supplies top_k, the balancing bias, norm_topk_prob and
    routed_scaling_factor (the Router itself, or a decode step holding copies)."""
    # The balancing bias decides *which* experts; it never enters the weights, so it carries no gradient (top-k's
    # indices carry none whatever its input, so the scores need no detach: one operation less per decode step).
    expert_indices = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
    weights = scores.gather(1, expert_indices)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_indices, weights * router.routed_scaling_factor


DENSE_DISPATCH_MAX_ROWS = 1024
"""Up to this many (tokens x experts), RoutedExperts runs every expert on every token (see ``dense_forward``): at a
32-token micro-batch that is one-sixth of the operations and no host sync; beyond it the extra arithmetic costs more."""


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors (transformers' DeepseekV3 layout) so tokens can be grouped by
    expert and each group multiplied at once: one grouped matmul where torch has one, else one matmul per expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act = ACT2FN[hidden_act]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def extra_repr(self) -> str:
        h, i = self.hidden_size, self.intermediate_size
        return f"num_experts={self.num_experts}, SwiGLU gate/up {h}->{i}, down {i}->{h}, bias=False"

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * self.num_experts <= DENSE_DISPATCH_MAX_ROWS:
            return self.dense_forward(x, expert_indices, weights)
        return self.grouped_forward(x, expert_indices, weights)

    def dense_forward(self, x: torch.Tensor, expert_indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token in two GEMMs, each expert's activation scaled by the token's gating weight
        (exactly zero where the token was not routed there, so outputs and gradients are the routed ones).

        For a few tokens this costs n/k times the routed arithmetic but a handful of operations instead of several
        per expert, and no token counts ever reach the host (no sync, nothing data-dependent for torch.compile)."""
        tokens = x.shape[0]
        gates = torch.zeros(tokens, self.num_experts, dtype=weights.dtype, device=x.device).scatter(1, expert_indices, weights)
        gate_up = linear(x, self.gate_up_proj.view(-1, self.hidden_size)).view(tokens, self.num_experts, -1)
        gate, up = gate_up.chunk(2, dim=-1)
        activation = self.act(gate) * up * gates[..., None].to(gate.dtype)
        # Summing the experts' down projections is one GEMM over the concatenated [E * I] activations.
        down = self.down_proj.permute(1, 0, 2).reshape(self.hidden_size, -1)
        return linear(activation.reshape(tokens, -1), down).to(x.dtype)

    def grouped_forward(self, x: torch.Tensor, expert_indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, each expert's rows multiplied at once (grouped GEMM on CUDA)."""
        top_k = expert_indices.shape[1]
        flat_experts = expert_indices.flatten()
        order = flat_experts.argsort(stable=True)
        token_of_slot = order // top_k
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)
        grouped = expert_swiglu(x[token_of_slot], self.gate_up_proj, self.down_proj, tokens_per_expert, self.act)
        grouped = grouped * weights.flatten()[order, None].to(grouped.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, grouped.to(x.dtype))


def expert_swiglu(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, tokens_per_expert: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The gated MLP (gate activation `act`) of rows of x already sorted by expert, with tokens_per_expert[e] rows for
    expert e."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, gate_up_proj, down_proj = x.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    if grouped_mm_supported(x, gate_up_proj, down_proj):
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(act(gate) * up, down_proj.transpose(1, 2), offs=offsets)
    outputs = []
    for expert, rows in enumerate(x.split(tokens_per_expert.tolist())):
        gate, up = linear(rows, gate_up_proj[expert]).chunk(2, dim=-1)
        outputs.append(linear(act(gate) * up, down_proj[expert]))
    return torch.cat(outputs)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    # torch._grouped_mm has no public equivalent (tests/test_torch_internals.py pins its meaning); it wants 16-byte
    # aligned rows. Its CPU kernel has no working backward (torch 2.13), so it is
    # used on CUDA only; on CPU one matmul per expert is as fast at these sizes.
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    alignment = 16 // x.element_size()
    return all(size % alignment == 0 for w in weights for size in w.shape[1:])


class DeepSeekMoE(nn.Module):
    """Shared experts that every token uses, plus top-k of n fine-grained routed experts.

    The layer counts how many tokens each routed expert received during training-mode forwards
    (``expert_counts``); ``update_load_balance_bias`` turns those counts into the bias step.
    """

    def __init__(self, config: TinySeekConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.bias_update_speed = config.bias_update_speed
        self.seq_aux_loss_coef = config.seq_aux_loss_coef
        self.gate = Router(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                     config.hidden_act)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.hidden_act)
            if config.n_shared_experts
            else None
        )
        self.register_buffer("expert_counts", torch.zeros(config.n_routed_experts), persistent=False)
        self.register_buffer("last_expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the block's output and its sequence-wise balance loss (None when disabled or not training)."""
        batch, seq_len, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)
        expert_indices, weights, scores = self.gate(tokens)
        if self.training and not in_backward_recomputation():
            self.expert_counts += torch.bincount(expert_indices.flatten(), minlength=self.expert_counts.numel())
        output = self.experts(tokens, expert_indices, weights).view_as(hidden_states)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        balance_loss = None
        if self.training and self.seq_aux_loss_coef > 0:
            balance_loss = self.sequence_balance_loss(scores.view(batch, seq_len, -1), expert_indices.view(batch, seq_len, -1))
        return output, balance_loss

    def sequence_balance_loss(self, scores: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise loss: alpha * sum_i f_i * P_i, averaged over sequences."""
        num_experts, seq_len = scores.shape[-1], scores.shape[1]
        chosen = torch.zeros_like(scores).scatter_(2, expert_indices, 1.0)
        fraction = chosen.sum(dim=1) * num_experts / (self.top_k * seq_len)
        probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.seq_aux_loss_coef * (fraction * probability).sum(dim=-1).mean()

    @torch.no_grad()
    def update_load_balance_bias(self) -> None:
        """b_i += u * sign(mean_load - load_i), centred to zero mean; then the counts restart."""
        load = self.expert_counts
        bias = self.gate.e_score_correction_bias
        bias += self.bias_update_speed * torch.sign(load.mean() - load)
        bias -= bias.mean()
        self.last_expert_load.copy_(load)
        load.zero_()

    def max_violation(self) -> float:
        """MaxVio = (max load - mean load) / mean load over the counts of the last bias update."""
        load = self.last_expert_load
        mean = load.mean()
        return float((load.max() - mean) / mean) if mean > 0 else 0.0


def in_backward_recomputation() -> bool:
    # Gradient checkpointing re-runs forward inside the backward pass; counting there would count tokens twice. No
    # public torch API tells whether the autograd engine is running; tests/test_torch_internals.py pins this one.
    return torch._C._current_graph_task_id() != -1


class SwiGLUStep:
    """The dense MLP for a few rows: gate and up projections in one GEMM against weights arranged once."""

    decodes = SwiGLU

    def __init__(self, module: SwiGLU, weights_dtype: torch.dtype | None = None):
        self.act = module.act
        self.gate_up = transposed(module.gate_proj.weight, module.up_proj.weight, dtype=weights_dtype)
        self.down = transposed(module.down_proj.weight, dtype=weights_dtype)

    def new_cache(self, batch: int, capacity: int) -> None:
        return None

    def __call__(self, x: torch.Tensor, cache=None, routed: list | None = None) -> torch.Tensor:
        gate, up = project(x, self.gate_up).chunk(2, dim=-1)
        return project(self.act(gate) * up, self.down)


class DeepSeekMoEStep:
    """DeepSeekMoE for a few tokens. One token, with few of the experts chosen: the shared experts and its top-k
    experts, whose weights are gathered. Otherwise: every expert in two GEMMs, the shared experts as extra columns
    with gate 1, activations scaled by the gates; cheaper than grouping rows by expert at these sizes."""

    decodes = DeepSeekMoE

    def __init__(self, module: DeepSeekMoE, weights_dtype: torch.dtype | None = None):
        router, experts = module.gate, module.experts
        self.dtype = router.weight.dtype
        weights_dtype = weights_dtype or self.dtype
        # The router stays in the model's dtype, as in training (`Router`): its choices are discrete.
        self.router, self.router_bias = transposed(router.weight), joined_bias([router])
        self.e_score_correction_bias = router.e_score_correction_bias.detach().clone()
        self.top_k, self.score = router.top_k, SCORING_FUNCTIONS[router.scoring_func]
        self.norm_topk_prob, self.routed_scaling_factor = router.norm_topk_prob, router.routed_scaling_factor
        self.num_experts, intermediate = experts.num_experts, experts.intermediate_size
        self.act = experts.act  # the shared experts' too: one hidden_act per model
        experts_gate_up = experts.gate_up_proj.detach().transpose(1, 2)  # [E, hidden, 2I]
        self.experts_down = experts.down_proj.detach().to(weights_dtype).transpose(1, 2).contiguous()  # [E, I, hidden]
        # Gathering copies the chosen weights (a read and a write) and the GEMMs read the copy: about 3k/E of the
        # bytes that running every expert reads, which at batch 1 is what a step costs.
        self.gather = 3 * self.top_k < self.num_experts
        if self.gather:
            self.experts_gate_up_by_input = experts_gate_up.permute(1, 0, 2).to(weights_dtype).contiguous()  # [hidden, E, 2I]
        self.shared = SwiGLUStep(module.shared_experts, weights_dtype) if module.shared_experts is not None else None
        # Every expert at once: columns [shared | expert 0 | expert 1 | ...] of the gate and of the up projection.
        gates = [experts_gate_up[..., :intermediate].permute(1, 0, 2).flatten(1)]
        ups = [experts_gate_up[..., intermediate:].permute(1, 0, 2).flatten(1)]
        downs = [experts.down_proj.detach().transpose(1, 2).flatten(0, 1)]
        column_gate = torch.arange(self.num_experts).repeat_interleave(intermediate)
        if self.shared is not None:
            shared_gate, shared_up = self.shared.gate_up.chunk(2, dim=1)
            gates.insert(0, shared_gate)
            ups.insert(0, shared_up)
            downs.insert(0, self.shared.down)
            column_gate = torch.cat((column_gate.new_full((shared_gate.shape[1],), self.num_experts), column_gate))
        self.all_gate_up = arranged(torch.cat(gates + ups, dim=1), weights_dtype)
        self.all_down = arranged(torch.cat(downs), weights_dtype)
        self.column_gate = column_gate.to(self.all_down.device)

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        """The gates of [routed experts | shared experts (always 1)], rewritten each step."""
        gates = self.all_down.new_zeros(batch, self.num_experts + 1, dtype=self.dtype)
        gates[:, -1] = 1.0
        return gates

    def __call__(self, x: torch.Tensor, gates: torch.Tensor, routed: list | None = None) -> torch.Tensor:
        chosen, weights = choose_experts(self.score(project(x, self.router, self.router_bias)), self)
        if routed is not None:
            routed.append(chosen)
        if x.shape[0] == 1 and self.gather:
            return self.chosen_experts(x, chosen[0], weights[0])
        gates = gates[: x.shape[0]]
        gates[:, :-1] = 0
        gates.scatter_(1, chosen, weights)
        gate, up = project(x, self.all_gate_up).chunk(2, dim=-1)
        return project(self.act(gate) * up * gates[:, self.column_gate], self.all_down)

    def chosen_experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token [1, hidden] through its experts: two GEMMs against the chosen experts' weights side by side (a
        compiled step turns a single-row batched matmul into a slow reduction, so these are plain GEMMs)."""
        gate_up = self.experts_gate_up_by_input.index_select(1, chosen).view(x.shape[-1], -1)
        gate, up = project(x, gate_up).view(self.top_k, -1).chunk(2, dim=-1)
        activation = (self.act(gate) * up * weights[:, None]).view(1, -1)
        # Scaled by their gates, the experts' activations against their down projections stacked along the inner
        # dimension give the gate-weighted sum of the experts' outputs.
        output = project(activation, self.experts_down.index_select(0, chosen).view(-1, x.shape[-1]))
        return output + self.shared(x) if self.shared is not None else output


@dataclass(frozen=True)
class FeedForwardSpec:
    """What the model, the decoders, the FLOP count and the export need to know about one feed-forward type. Every
    field but ``name`` is required."""

    build: Callable[[TinySeekConfig], nn.Module]
    """The layer's module. A routing module returns (output, balance loss or None); a dense one, the output."""
    decode_step: type | None
    """The single-token decode step (`tinyseek.decoding`) built from the module, or None where the type decodes
    through the model's own forward."""
    routes: bool
    """Whether tokens are routed to experts (balancing, expert counts, capture of routed experts, routing maps)."""
    parameters_per_token: Callable[[nn.Module], int]
    """The module's parameters one token's forward uses; its training FLOPs are 6 times these."""
    validate: Callable[[TinySeekConfig], None]
    """Raise ConfigError naming the field when the config's fields for this type are inconsistent."""
    transformers_problem: Callable[[TinySeekConfig, str], str | None]
    """Why a transformers twin (a ``tinyseek.hf.TWINS`` key) cannot express this feed-forward, or None."""
    name: str = ""
    """Filled in by ``register_feed_forward``."""

    def __reduce__(self):
        # As AttentionSpec: it crosses to another process as its registered name.
        return feed_forward_spec, (self.name,)


FEED_FORWARD_REGISTRY: dict[str, FeedForwardSpec] = {}


def register_feed_forward(name: str, spec: FeedForwardSpec) -> None:
    if name in FEED_FORWARD_REGISTRY:
        raise TypeError(f"feed-forward type {name!r} is already registered")
    FEED_FORWARD_REGISTRY[name] = replace(spec, name=name)


def feed_forward_spec(name: str) -> FeedForwardSpec:
    return registered(FEED_FORWARD_REGISTRY, "ffn_type", "feed-forward type", name)


def validate_feed_forward(config: TinySeekConfig) -> None:
    feed_forward_spec(config.ffn_type).validate(config)


ARCHITECTURE_CHECKS.append(validate_feed_forward)


def validate_moe(config: TinySeekConfig) -> None:
    def fail(field: str, reason: str):
        raise ConfigError(f"{field}: {reason}")

    require_positive(config, "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
    require_non_negative(config, "n_shared_experts")
    if config.num_experts_per_tok > config.n_routed_experts:
        fail("num_experts_per_tok", f"top-k={config.num_experts_per_tok} is larger than n_routed_experts={config.n_routed_experts}")
    if config.scoring_func not in SCORING_FUNCTIONS:
        fail("scoring_func", f"unknown scoring function {config.scoring_func!r}; choose one of {tuple(SCORING_FUNCTIONS)}")
    if config.num_experts_per_tok == 1 and config.norm_topk_prob:
        fail(
            "norm_topk_prob",
            "with num_experts_per_tok=1 renormalising makes every gate weight 1.0, so the router gets no gradient; "
            "set norm_topk_prob=False",
        )
    if config.bias_update_speed < 0:
        fail("bias_update_speed", f"must be non-negative, got {config.bias_update_speed}")
    if config.seq_aux_loss_coef < 0:
        fail("seq_aux_loss_coef", f"must be non-negative, got {config.seq_aux_loss_coef}")
    if config.routed_scaling_factor <= 0:
        fail("routed_scaling_factor", f"must be positive, got {config.routed_scaling_factor}")


def moe_transformers_problem(config: TinySeekConfig, model_type: str) -> str | None:
    if model_type != "deepseek_v3":
        return f"a MoE has no {model_type} twin here (only DeepseekV3 routes); use ffn_type='dense'"
    if config.scoring_func != "sigmoid":
        return "transformers' DeepseekV3 router scores experts with a sigmoid; this model uses softmax"
    if config.router_bias:
        return "transformers' DeepseekV3 router has no learnable bias (router_bias=True here)"
    if config.n_routed_experts < 2:
        return "transformers' DeepseekV3 router needs at least 2 routed experts"
    return None


def moe_parameters_per_token(moe: DeepSeekMoE) -> int:
    """Everything but the routed experts a token is not sent to (k of n are used)."""
    routed = sum(p.numel() for p in moe.experts.parameters())
    return sum(p.numel() for p in moe.parameters()) - routed + routed * moe.top_k // moe.experts.num_experts


def all_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


register_feed_forward("dense", FeedForwardSpec(
    build=lambda config: SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act),
    decode_step=SwiGLUStep,
    routes=False,
    parameters_per_token=all_parameters,
    validate=lambda config: None,  # intermediate_size is checked for every model: DeepSeek's first layers are dense
    # Llama's MLP and DeepseekV3's dense layers are gated MLPs with the config's hidden_act, as here.
    transformers_problem=lambda config, model_type: None,
))
register_feed_forward("moe", FeedForwardSpec(
    build=DeepSeekMoE,
    decode_step=DeepSeekMoEStep,
    routes=True,
    parameters_per_token=moe_parameters_per_token,
    validate=validate_moe,
    transformers_problem=moe_transformers_problem,
))
