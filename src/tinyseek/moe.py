"""Feed-forward blocks: the dense SwiGLU MLP and DeepSeekMoE (shared plus fine-grained routed experts).

Routing follows DeepSeek-V3: experts are *selected* by score + a per-expert bias that the trainer nudges towards
balance once per optimizer step (auxiliary-loss-free balancing), while the *gating weights* come from the unbiased
scores. Parameter names and layouts match transformers' DeepseekV3 so that weights convert by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyseek.config import TinySeekConfig
# A drop-in nn.Linear / F.linear whose bf16-autocast matmuls avoid torch's slow CPU fallback (see tinyseek.ops).
from tinyseek.ops import Linear, fused_linear, linear


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


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
        return logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (expert indices [N, k], gating weights [N, k], scores [N, E]) for tokens x [N, H]."""
        scores = self.scores(x)
        # The balancing bias decides *which* experts; it never enters the weights, so it carries no gradient.
        expert_indices = torch.topk(scores.detach() + self.e_score_correction_bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, expert_indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_indices, weights * self.routed_scaling_factor, scores


DENSE_DISPATCH_MAX_ROWS = 1024
"""Up to this many (tokens x experts), RoutedExperts runs every expert on every token (see ``dense_forward``): at a
32-token micro-batch that is one-sixth of the operations and no host sync; beyond it the extra arithmetic costs more."""


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors (transformers' DeepseekV3 layout) so tokens can be grouped by
    expert and each group multiplied at once: one grouped matmul where torch has one, else one matmul per expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
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
        activation = F.silu(gate) * up * gates[..., None].to(gate.dtype)
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
        grouped = expert_swiglu(x[token_of_slot], self.gate_up_proj, self.down_proj, tokens_per_expert)
        grouped = grouped * weights.flatten()[order, None].to(grouped.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, grouped.to(x.dtype))


def expert_swiglu(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of rows of x already sorted by expert, with tokens_per_expert[e] rows for expert e."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, gate_up_proj, down_proj = x.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    if grouped_mm_supported(x, gate_up_proj, down_proj):
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
    outputs = []
    for expert, rows in enumerate(x.split(tokens_per_expert.tolist())):
        gate, up = linear(rows, gate_up_proj[expert]).chunk(2, dim=-1)
        outputs.append(linear(F.silu(gate) * up, down_proj[expert]))
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
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
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


def build_feed_forward(config: TinySeekConfig, layer_idx: int) -> nn.Module:
    if config.is_moe_layer(layer_idx):
        return DeepSeekMoE(config)
    return SwiGLU(config.hidden_size, config.intermediate_size)
