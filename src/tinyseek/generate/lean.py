"""The lean decode step: one new token per row from preallocated caches, with the model's weights rearranged once.

At these sizes a decode step does ~10 MFLOP, well under a millisecond of arithmetic; what costs is the number of
operations, each a few microseconds of dispatch, and GEMM calls in the shape BLAS is slow at. The model's own forward
(training-shaped: masks, caches that grow by concatenation, projections joined per call) runs several hundred
operations per token. Here each layer is a handful:

* every weight is stored once as [in, out], contiguous: for one row, ``x @ W`` runs MKL's fast path, while
  ``F.linear(x, W)`` on the [out, in] parameter runs a transposed GEMM, much slower for the vocabulary-wide head;
* projections that read the same input are one GEMM against weights concatenated once, not per call;
* MLA decodes from its latent with the key up-projection folded into the query projection and the value
  up-projection into the output projection (exact algebra, computed once), so a step is one attention of every
  head against a single shared [latent | RoPE key] cache, through fused SDPA;
* linear attention keeps S and z as one [d, d + 1] state per head (z is S's column for a constant value 1, which
  the value projection's bias produces), so the update is one batched rank-1 product and the read-out one matmul;
* RoPE is x * cos + (x @ R) * sin with R rotate-half's signed permutation, from tables built once;
* caches are written in place at the step's column; nothing grows, nothing is concatenated;
* a single token's MoE reads only its chosen experts' weights, gathered on the device (no host sync, so the step
  compiles to one graph); larger batches run every expert in two GEMMs, each activation scaled by the token's gate
  (zero where it was not routed).

The prefill runs the model's own forward (compute-bound, already fast) and the caches are copied in once. Each
attention and feed-forward module class registers its step in ``LEAN_STEPS``; a model with a module that has none
decodes through the model's forward instead.
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tinyseek.attention import LINEAR_ATTENTION_EPS, LinearAttention, MultiHeadAttention, MultiHeadLatentAttention
from tinyseek.moe import DeepSeekMoE, SwiGLU


def transposed(*weights: torch.Tensor) -> torch.Tensor:
    """[in, out] contiguous copy of nn.Linear weights [out, in] stacked along out."""
    return torch.cat([w.detach() for w in weights]).t().contiguous()


def joined_bias(layers) -> torch.Tensor | None:
    """The layers' biases side by side (zeros for a layer without one), or None if none has a bias."""
    if all(getattr(layer, "bias", None) is None for layer in layers):
        return None
    return torch.cat([layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.out_features) for layer in layers])


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


class Rotary:
    """cos and sin for every position. RoPE is x * cos + rotate_half(x) * sin, and rotate_half(x) = [-x2, x1] is
    linear in x: the projections that produce a RoPE'd vector also produce its rotated copy (``with_rotated``), so
    applying RoPE is two elementwise operations and no extra GEMM."""

    def __init__(self, rotary_embedding, positions: int, device):
        cos, sin = rotary_embedding(torch.arange(positions, device=device)[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    @staticmethod
    def apply(x: torch.Tensor, rotated: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [B, heads, d] given rotate_half(x), with cos/sin [B, 1, d]."""
        return torch.addcmul(x * cos, rotated, sin)


def rotated_rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The rows of a [heads * dim, in] projection that produce rotate_half of its output, head by head."""
    heads = weight.view(-1, dim, weight.shape[-1])
    first, second = heads.chunk(2, dim=1)
    return torch.cat((-second, first), dim=1).flatten(0, 1)


@dataclass
class Step:
    """What every layer reads in one step: the rows' cos/sin for RoPE ([B, 1, d] or None), the cache column written
    (a one-element tensor, so a compiled step does not specialise on it), the number of cache columns attended, and
    the additive mask over them (None when no column needs masking)."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    column: torch.Tensor
    length: int
    mask: torch.Tensor | None


class LeanMultiHeadAttention:
    def __init__(self, module: MultiHeadAttention):
        self.heads, self.kv_heads, self.head_dim = module.num_heads, module.num_kv_heads, module.head_dim
        # x -> [q | k | v | rotate_half(q) | rotate_half(k)] in one GEMM, with the softmax scale folded into q.
        scale = self.head_dim**-0.5
        layers = (module.q_proj, module.k_proj, module.v_proj)
        q_and_k = torch.cat((module.q_proj.weight.detach() * scale, module.k_proj.weight.detach()))
        self.qkv = transposed(q_and_k, module.v_proj.weight, rotated_rows(q_and_k, self.head_dim))
        bias = joined_bias(layers)
        if bias is not None:
            bias[: self.heads * self.head_dim] *= scale
            q_and_k_bias = bias[: (self.heads + self.kv_heads) * self.head_dim]
            bias = torch.cat((bias, rotated_rows(q_and_k_bias[:, None], self.head_dim)[:, 0]))
        self.qkv_bias = bias
        self.out, self.out_bias = transposed(module.o_proj.weight), joined_bias([module.o_proj])

    def new_cache(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        return self.qkv.new_zeros(shape), self.qkv.new_zeros(shape)

    def load(self, cache, cache_layer, length: int) -> None:
        cache[0][:, :, :length] = cache_layer.keys
        cache[1][:, :, :length] = cache_layer.values

    def __call__(self, x: torch.Tensor, step: Step, cache, rotary: Rotary) -> torch.Tensor:
        batch, keys, values = x.shape[0], cache[0], cache[1]
        heads = self.heads + self.kv_heads
        qkv = project(x, self.qkv, self.qkv_bias).view(batch, -1, self.head_dim)
        q_and_k = rotary.apply(qkv[:, :heads], qkv[:, heads + self.kv_heads :], step.cos, step.sin)
        keys.index_copy_(2, step.column, q_and_k[:, self.heads :, None])
        values.index_copy_(2, step.column, qkv[:, heads : heads + self.kv_heads, None])
        # Two batched matmuls, query heads grouped by their key head: for one query row this is several times
        # faster than SDPA's kernel, whose set-up costs more than the arithmetic.
        query = q_and_k[:, : self.heads].view(batch, self.kv_heads, -1, self.head_dim)
        scores = query @ keys[:, :, : step.length].transpose(2, 3)
        if step.mask is not None:
            scores = scores + step.mask
        output = scores.softmax(dim=-1) @ values[:, :, : step.length]
        return project(output.view(batch, -1), self.out, self.out_bias)


class LeanLatentAttention:
    """Absorbed MLA: q_latent_h = (W_uk_h^T W_q_nope_h) x and out = sum_h W_o_h W_uv_h context_h, folded once (the
    softmax scale too); the keys are the cache [c_kv | k_rope] itself and the values its first kv_lora_rank
    columns, so attention is two batched matmuls against one shared cache for all heads."""

    def __init__(self, module: MultiHeadLatentAttention):
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
            self.first = transposed(module.q_a_proj.weight, compress_rows)
            self.first_bias = joined_bias([module.q_a_proj, module.kv_a_proj_with_mqa])
            if self.first_bias is not None:
                self.first_bias = torch.cat((self.first_bias, self.first_bias.new_zeros(rope)))
                if compress_bias is not None:
                    self.first_bias[module.q_lora_rank :] = compress_bias
            self.q_norm, self.q_norm_eps = module.q_a_layernorm.weight.detach().contiguous(), module.q_a_layernorm.eps
            self.query = transposed(query_rows)
            self.split = [module.q_lora_rank, rank, rope, rope]
        else:  # x -> [query rows | c_kv | k_rope | rot] in one GEMM
            self.first = transposed(query_rows, compress_rows)
            self.first_bias = None
            if compress_bias is not None:
                self.first_bias = torch.cat((compress_bias.new_zeros(query_rows.shape[0]), compress_bias))
            self.split = [query_rows.shape[0], rank, rope, rope]
        self.kv_norm, self.kv_norm_eps = module.kv_a_layernorm.weight.detach().contiguous(), module.kv_a_layernorm.eps
        out = module.o_proj.weight.detach().view(-1, heads, v_dim)
        self.out = torch.einsum("ohv,hvr->hro", out, up_value).flatten(0, 1).contiguous()
        self.out_bias = joined_bias([module.o_proj])

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        return self.out.new_zeros(batch, capacity, self.rank + self.rope)

    def load(self, cache, cache_layer, length: int) -> None:
        cache[:, :length, : self.rank] = cache_layer.keys[:, 0]
        cache[:, :length, self.rank :] = cache_layer.values[:, 0]

    def __call__(self, x: torch.Tensor, step: Step, cache, rotary: Rotary) -> torch.Tensor:
        batch, heads, rank, rope = x.shape[0], self.heads, self.rank, self.rope
        query, latent, k_rope, k_rotated = project(x, self.first, self.first_bias).split(self.split, dim=-1)
        if self.q_lora:
            query = F.rms_norm(query, query.shape[-1:], self.q_norm, self.q_norm_eps) @ self.query
        q_latent = query[:, : heads * rank].view(batch, heads, rank)
        q_rope = query[:, heads * rank :].view(batch, 2, heads, rope)
        q_rope = Rotary.apply(q_rope[:, 0], q_rope[:, 1], step.cos, step.sin)
        latent = F.rms_norm(latent, latent.shape[-1:], self.kv_norm, self.kv_norm_eps)
        k_rope = Rotary.apply(k_rope, k_rotated, step.cos[:, 0], step.sin[:, 0])
        cache.index_copy_(1, step.column, torch.cat((latent, k_rope), dim=-1)[:, None])
        keys = cache[:, : step.length]
        scores = torch.bmm(torch.cat((q_latent, q_rope), dim=-1), keys.transpose(1, 2))
        if step.mask is not None:
            scores = scores + step.mask[:, 0]
        context = torch.bmm(scores.softmax(dim=-1), keys[..., :rank])
        return project(context.view(batch, -1), self.out, self.out_bias)


class LeanLinearAttention:
    """S and z as one state [B * heads, d, d + 1]: the value projection gains, per head, a column with weight 0 and
    bias 1, so phi(k) [v | 1]^T adds phi(k) v^T to S and phi(k) to z at once, and phi(q) [S | z] gives both the
    numerator and the denominator."""

    def __init__(self, module: LinearAttention):
        heads, dim = module.num_heads, module.head_dim
        self.heads, self.dim = heads, dim
        hidden = module.q_proj.weight.shape[1]
        value = module.v_proj.weight.detach().view(heads, dim, hidden)
        value = torch.cat((value, value.new_zeros(heads, 1, hidden)), dim=1).flatten(0, 1)
        self.qkv = transposed(module.q_proj.weight, module.k_proj.weight, value)
        zeros = value.new_zeros(heads * dim)
        biases = [p.bias.detach() if p.bias is not None else zeros for p in (module.q_proj, module.k_proj, module.v_proj)]
        value_bias = torch.cat((biases[2].view(heads, dim), zeros.new_ones(heads, 1)), dim=1).flatten()
        self.qkv_bias = torch.cat((biases[0], biases[1], value_bias))
        self.out, self.out_bias = transposed(module.o_proj.weight), joined_bias([module.o_proj])

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        return self.qkv.new_zeros(batch * self.heads, self.dim, self.dim + 1)

    def load(self, cache, cache_layer, length: int) -> None:
        state = cache.view(-1, self.heads, self.dim, self.dim + 1)
        state[..., : self.dim] = cache_layer.state
        state[..., self.dim] = cache_layer.normalizer

    def __call__(self, x: torch.Tensor, step: Step, cache, rotary) -> torch.Tensor:
        batch, heads, dim = x.shape[0], self.heads, self.dim
        qkv = torch.addmm(self.qkv_bias, x, self.qkv)
        features = F.elu(qkv[:, : 2 * heads * dim]) + 1
        query, key = features.view(batch, 2, heads * dim).unbind(1)
        value = qkv[:, 2 * heads * dim :].reshape(batch * heads, 1, dim + 1)
        cache.baddbmm_(key.reshape(batch * heads, dim, 1), value)
        read = torch.bmm(query.reshape(batch * heads, 1, dim), cache).view(batch, heads, dim + 1)
        output = read[..., :dim] / (read[..., dim:] + LINEAR_ATTENTION_EPS)
        return project(output.view(batch, -1), self.out, self.out_bias)


class LeanSwiGLU:
    def __init__(self, module: SwiGLU):
        self.gate_up = transposed(module.gate_proj.weight, module.up_proj.weight)
        self.down = transposed(module.down_proj.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down


class LeanMoE:
    """DeepSeekMoE for a few tokens. One token, with few of the experts chosen: the shared experts and its top-k
    experts, whose weights are gathered. Otherwise: every expert in two GEMMs, the shared experts as extra columns
    with gate 1, activations scaled by the gates; cheaper than grouping rows by expert at these sizes."""

    def __init__(self, module: DeepSeekMoE):
        router, experts = module.gate, module.experts
        self.router, self.router_bias = transposed(router.weight), joined_bias([router])
        self.correction = router.e_score_correction_bias.detach().clone()
        self.top_k, self.softmax = router.top_k, router.scoring_func == "softmax"
        self.norm_topk, self.scaling = router.norm_topk_prob, router.routed_scaling_factor
        self.num_experts, intermediate = experts.num_experts, experts.intermediate_size
        experts_gate_up = experts.gate_up_proj.detach().transpose(1, 2)  # [E, hidden, 2I]
        self.experts_down = experts.down_proj.detach().transpose(1, 2).contiguous()  # [E, I, hidden]
        # Gathering copies the chosen weights (a read and a write) and the GEMMs read the copy: about 3k/E of the
        # bytes that running every expert reads, which at batch 1 is what a step costs.
        self.gather = 3 * self.top_k < self.num_experts
        if self.gather:
            self.experts_gate_up_by_input = experts.gate_up_proj.detach().permute(2, 0, 1).contiguous()  # [hidden, E, 2I]
        self.shared = LeanSwiGLU(module.shared_experts) if module.shared_experts is not None else None
        # Every expert at once: columns [shared | expert 0 | expert 1 | ...] of the gate and of the up projection.
        gates = [experts_gate_up[..., :intermediate].permute(1, 0, 2).flatten(1)]
        ups = [experts_gate_up[..., intermediate:].permute(1, 0, 2).flatten(1)]
        downs = [self.experts_down.flatten(0, 1)]
        column_gate = torch.arange(self.num_experts).repeat_interleave(intermediate)
        if self.shared is not None:
            shared_gate, shared_up = self.shared.gate_up.chunk(2, dim=1)
            gates.insert(0, shared_gate)
            ups.insert(0, shared_up)
            downs.insert(0, self.shared.down)
            column_gate = torch.cat((column_gate.new_full((shared_gate.shape[1],), self.num_experts), column_gate))
        self.all_gate_up = torch.cat(gates + ups, dim=1).contiguous()
        self.all_down = torch.cat(downs).contiguous()
        self.column_gate = column_gate.to(self.all_down.device)

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        """The gates of [routed experts | shared experts (always 1)], rewritten each step."""
        gates = self.all_down.new_zeros(batch, self.num_experts + 1)
        gates[:, -1] = 1.0
        return gates

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = project(x, self.router, self.router_bias)
        scores = scores.softmax(dim=-1) if self.softmax else scores.sigmoid()
        chosen = torch.topk(scores + self.correction, self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scaling

    def __call__(self, x: torch.Tensor, gates: torch.Tensor, routed: list | None = None) -> torch.Tensor:
        chosen, weights = self.route(x)
        if routed is not None:
            routed.append(chosen)
        if x.shape[0] == 1 and self.gather:
            return self.chosen_experts(x, chosen[0], weights[0])
        gates = gates[: x.shape[0]]
        gates[:, :-1] = 0
        gates.scatter_(1, chosen, weights)
        gate, up = (x @ self.all_gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up * gates[:, self.column_gate]) @ self.all_down

    def chosen_experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token [1, hidden] through its experts: two GEMMs against the chosen experts' weights side by side (a
        compiled step turns a single-row batched matmul into a slow reduction, so these are plain GEMMs)."""
        gate_up = self.experts_gate_up_by_input.index_select(1, chosen).view(x.shape[-1], -1)
        gate, up = (x @ gate_up).view(self.top_k, -1).chunk(2, dim=-1)
        activation = (F.silu(gate) * up * weights[:, None]).view(1, -1)
        # Scaled by their gates, the experts' activations against their down projections stacked along the inner
        # dimension give the gate-weighted sum of the experts' outputs.
        output = activation @ self.experts_down.index_select(0, chosen).view(-1, x.shape[-1])
        return output + self.shared(x) if self.shared is not None else output


LEAN_STEPS = {
    MultiHeadAttention: LeanMultiHeadAttention,
    MultiHeadLatentAttention: LeanLatentAttention,
    LinearAttention: LeanLinearAttention,
    SwiGLU: LeanSwiGLU,
    DeepSeekMoE: LeanMoE,
}


def supports_lean_decoding(model) -> bool:
    # Sharded parameters (FSDP2's DTensors, as in the trainer's samples) cannot be read whole by the lean step; the
    # model's own forward gathers them.
    if any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        return False
    return all(type(layer.self_attn) in LEAN_STEPS and type(layer.mlp) in LEAN_STEPS for layer in model.model.layers)


class LeanWeights:
    """The model's weights rearranged for the lean step; rebuilt only when a parameter or buffer changed. Every
    tensor is contiguous, which the compiled step relies on."""

    def __init__(self, model):
        decoder = model.model
        self.version = weights_version(model)
        device = decoder.embed_tokens.weight.device
        self.rotary = (
            Rotary(decoder.rotary_emb, model.config.max_position_embeddings, device)
            if decoder.rotary_emb is not None
            else None
        )
        self.layers = []
        for layer in decoder.layers:
            norms = [(norm.weight.detach().contiguous(), norm.eps) for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
            attention = LEAN_STEPS[type(layer.self_attn)](layer.self_attn)
            self.layers.append((norms[0], attention, norms[1], LEAN_STEPS[type(layer.mlp)](layer.mlp)))
        self.embedding = decoder.embed_tokens.weight.detach().contiguous()
        self.final_norm = (decoder.norm.weight.detach().contiguous(), decoder.norm.eps)
        self.head = transposed(model.lm_head.weight)


def weights_version(model) -> tuple:
    """Changes whenever a parameter or buffer is replaced or updated in place by an autograd-visible op.

    Fused optimizers (``AdamW(fused=True)``, the trainer's) write parameters without bumping ``_version``, so an
    engine kept across training steps would decode with stale weights: the trainer builds a new engine for each
    round of samples, and so should anyone who trains between generations."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def lean_step(weights: LeanWeights, caches: list, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
              mask: torch.Tensor | None, length: int, capture: bool):
    """Logits [B, V] for one new token per row, and with ``capture`` the routed experts [B, MoE layers, k]."""
    rotary = weights.rotary
    cos, sin = (rotary.cos[positions, None], rotary.sin[positions, None]) if rotary is not None else (None, None)
    step = Step(cos, sin, column, length, mask)
    routed = [] if capture else None
    x = F.embedding(tokens, weights.embedding)
    for ((norm, eps), attention, (ffn_norm, ffn_eps), feed_forward), (cache, gates) in zip(weights.layers, caches):
        x = x + attention(F.rms_norm(x, x.shape[-1:], norm, eps), step, cache, rotary)
        normed = F.rms_norm(x, x.shape[-1:], ffn_norm, ffn_eps)
        x = x + (feed_forward(normed, gates, routed) if gates is not None else feed_forward(normed))
    logits = F.rms_norm(x, x.shape[-1:], *weights.final_norm) @ weights.head
    return logits, (torch.stack(routed, dim=1) if routed else None)


COMPILE_FAILED = "torch.compile failed ({}); decoding with the eager lean step instead"


def warn_compile_failed(error: Exception) -> None:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    warnings.warn(COMPILE_FAILED.format(reason), RuntimeWarning, stacklevel=3)


@functools.cache
def compiled_lean_step(structure: str, capture: bool, batch: int, capacity: int, device_type: str):
    """`lean_step` through torch.compile for one decoder shape of models of one configuration (``structure``: the
    config as JSON): C++ kernels and a C++ wrapper that calls them on CPU, CUDA graphs on GPU. Compilation happens at
    the first call and takes tens of seconds.

    Before every call torch.compile checks guards on everything the step reads; over the whole LeanWeights object
    graph that is a sizeable share of a step. This step checks none. That is sound because nothing it reads can
    change between calls: the configuration fixes every constant (norm epsilons, head counts, top-k, routing scale),
    the key fixes ``capture`` and every shape, and `LeanDecoder` passes contiguous tensors only. Each key gets its own
    copy of lean_step's code object, which is where torch.compile keeps its compiled graph. The weights are inputs,
    not constants, so a retrained or reloaded model of the same configuration reuses the compiled step."""
    del structure, capture, batch, capacity  # the cache key
    step = types.FunctionType(lean_step.__code__.replace(), lean_step.__globals__, lean_step.__name__)
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    options.update({"triton.cudagraphs": True} if device_type == "cuda" else {"cpp_wrapper": True})
    return torch.compile(step, dynamic=False, options=options)


WARMED_UP: set = set()  # the compiled steps that have run (and so compiled) once


def static_capacity(needed: int, positions: int) -> int:
    """The cache columns of a compiled step: powers of two (at least 64) up to the model's positions, so that a
    server sees a handful of shapes (and compilations), not one per prompt length."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(positions, needed))


class LeanDecoder:
    """Prefill through the model's forward (`CachedForward`), then lean steps; the same interface.

    ``compiled`` steps with `compiled_lean_step`, which attends over the whole preallocated cache with future columns
    masked, so that its shapes never change; the eager `lean_step` attends over the live columns only."""

    def __init__(self, model, weights: LeanWeights, batch: int, capacity: int, capture: bool, compiled: bool = False):
        from tinyseek.generate.engine import CachedForward  # the engine imports this module

        self.prefill_forward = CachedForward(model, batch, capacity, capture)
        self.static, self.step_function = compiled, lean_step
        if compiled:
            capacity = static_capacity(capacity, model.config.max_position_embeddings)
            self.step_function = compiled_lean_step(
                model.config.to_json_string(), capture, batch, capacity, weights.head.device.type
            )
        self.weights, self.capacity, self.capture, self.batch = weights, capacity, capture, batch
        self.caches = self.new_caches()
        self.column = torch.zeros(1, dtype=torch.long, device=weights.head.device)
        self.mask = None
        self.routed: torch.Tensor | None = None
        self.prefilled = False

    def new_caches(self) -> list:
        return [
            (attention.new_cache(self.batch, self.capacity), feed_forward.new_cache(self.batch, self.capacity) if isinstance(feed_forward, LeanMoE) else None)
            for _, attention, _, feed_forward in self.weights.layers
        ]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.prefill_forward.prefill(input_ids, attention_mask)
        width = input_ids.shape[1]
        for (_, attention, _, _), (cache, _), cache_layer in zip(
            self.weights.layers, self.caches, self.prefill_forward.cache.layers
        ):
            attention.load(cache, cache_layer, width)
        self.prefill_forward.cache = None
        self.positions = attention_mask.sum(dim=1)
        self.width = width
        if self.static or not bool(attention_mask.all()):
            self.mask = self.weights.head.new_full((input_ids.shape[0], 1, 1, self.capacity), float("-inf"))
            self.mask[:, 0, 0, :width].masked_fill_(attention_mask.bool(), 0.0)
        if self.static and self.step_function not in WARMED_UP:
            self.warm_up(input_ids[:, -1])
        self.prefilled = True
        return logits

    def warm_up(self, tokens: torch.Tensor) -> None:
        """Compile before the first token rather than after it (a compiled step compiles at its first call), so
        that the time to the first token includes compilation and the rate of the next ones does not. The step runs
        on scratch caches: on the live ones it would add a token to linear attention's state. Once per compiled
        step: later decoders of the same shape find it compiled."""
        live, self.caches = self.caches, self.new_caches()
        try:
            self.step(tokens, commit=False)
        finally:
            self.caches = live
        if self.static:  # not fallen back to the eager step
            WARMED_UP.add(self.step_function)

    def step(self, tokens: torch.Tensor, commit: bool = True) -> torch.Tensor:
        column = self.width
        self.column.fill_(column)
        if self.static:
            self.mask[..., column] = 0.0
            length, mask = self.capacity, self.mask
        else:
            length = column + 1
            mask = self.mask[..., :length] if self.mask is not None else None
            if mask is not None:
                mask[..., column] = 0.0
        try:
            logits, self.routed = self.step_function(
                self.weights, self.caches, tokens.contiguous(), self.positions, self.column, mask, length, self.capture
            )
        except Exception as error:  # noqa: BLE001 - whatever stops compilation (no C++ compiler, an unsupported op)
            if not self.static:
                raise
            warn_compile_failed(error)
            self.step_function, self.static = lean_step, False
            return self.step(tokens, commit)
        if not commit:
            return logits
        self.width += 1
        self.positions += 1
        self.prefilled = False
        return logits

    @property
    def path(self) -> str:
        return "compiled lean step" if self.static else "lean step"

    def experts(self) -> list[list[list[int]]]:
        if self.prefilled:
            return self.prefill_forward.experts()
        if self.routed is None:
            return [[] for _ in range(len(self.positions))]
        return self.routed.tolist()
