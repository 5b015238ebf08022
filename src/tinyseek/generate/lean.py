"""The lean decoder: a prefill through the model's forward, then one new token per row from preallocated caches,
with the model's weights rearranged once.

This module is the driver only: it arranges every layer's weights once (`LeanWeights`, through the decode step that
each attention and feed-forward type declares beside its module; see `tinyseek.decoding`), runs the step loop
(`lean_step`), and compiles it (`compiled_lean_step`). The model's own forward (training-shaped: masks, caches that
grow by concatenation, projections joined per call) runs several hundred operations per token; the declared steps run
a handful per layer. The prefill runs the model's own forward (compute-bound, already fast) and the caches are copied
in once. A model with a module whose type declares no step, or whose class is not the one the step decodes, decodes
through the model's forward instead.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tinyseek.decoding import Rotary, Step, project, transposed
from tinyseek.device import WEIGHT_DTYPES
from tinyseek.generate.forward import CachedForward
from tinyseek.ops import soft_capped


def layer_decode_steps(model) -> list[tuple[type, type]] | None:
    """Each decoder layer's (attention step, feed-forward step) classes, or None where some layer has none. A step
    is only taken for the exact class it declares it decodes: a subclass decodes through the model's forward unless
    its own type declares a step."""
    # Sharded parameters (FSDP2's DTensors, as in the trainer's samples) cannot be read whole by the lean step; the
    # model's own forward gathers them.
    if any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        return None
    attention_step = model.model.attention.decode_step
    steps = []
    for layer in model.model.layers:
        feed_forward_step = layer.feed_forward_spec.decode_step
        if attention_step is None or feed_forward_step is None:
            return None
        if type(layer.self_attn) is not attention_step.decodes or type(layer.mlp) is not feed_forward_step.decodes:
            return None
        steps.append((attention_step, feed_forward_step))
    return steps


def supports_lean_decoding(model) -> bool:
    return layer_decode_steps(model) is not None


class LeanWeights:
    """The model's weights rearranged for the lean step, its GEMM weights (projections, experts, head) stored in
    ``dtype`` (default: the model's); rebuilt only when a parameter or buffer changed, or another dtype is asked for
    (`fits`). Every tensor is contiguous, which the compiled step relies on."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        decoder = model.model
        self.version = weights_version(model)
        self.dtype = dtype or decoder.embed_tokens.weight.dtype
        device = decoder.embed_tokens.weight.device
        self.rotary = (
            Rotary(decoder.rotary_emb, model.config.max_position_embeddings, device)
            if decoder.rotary_emb is not None
            else None
        )
        self.layers = []
        for layer, (attention_step, feed_forward_step) in zip(decoder.layers, layer_decode_steps(model)):
            norms = [(norm.weight.detach().contiguous(), norm.eps) for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
            attention, feed_forward = attention_step(layer.self_attn, self.dtype), feed_forward_step(layer.mlp, self.dtype)
            self.layers.append((norms[0], attention, norms[1], feed_forward))
        self.embedding = decoder.embed_tokens.weight.detach().contiguous()
        self.final_norm = (decoder.norm.weight.detach().contiguous(), decoder.norm.eps)
        self.head = transposed(model.lm_head.weight, dtype=self.dtype)
        self.softcap = model.config.final_logit_softcapping

    def fits(self, model, dtype: torch.dtype) -> bool:
        """Whether these are the model's current weights, arranged in ``dtype``."""
        return self.dtype == dtype and self.version == weights_version(model)


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
    for ((norm, eps), attention, (ffn_norm, ffn_eps), feed_forward), (cache, ffn_cache) in zip(weights.layers, caches):
        x = x + attention(F.rms_norm(x, x.shape[-1:], norm, eps), step, cache, rotary)
        x = x + feed_forward(F.rms_norm(x, x.shape[-1:], ffn_norm, ffn_eps), ffn_cache, routed)
    logits = soft_capped(project(F.rms_norm(x, x.shape[-1:], *weights.final_norm), weights.head), weights.softcap)
    return logits, (torch.stack(routed, dim=1) if routed else None)


COMPILE_FAILED = "torch.compile failed ({}); decoding with the eager lean step instead"


def warn_compile_failed(error: Exception) -> None:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    warnings.warn(COMPILE_FAILED.format(reason), RuntimeWarning, stacklevel=3)


@functools.cache
def compiled_lean_step(
    structure: str, capture: bool, batch: int, capacity: int, device_type: str, weights_dtype: torch.dtype
):
    """`lean_step` through torch.compile for one decoder shape of models of one configuration (``structure``: the
    config as JSON): C++ kernels and a C++ wrapper that calls them on CPU, CUDA graphs on GPU. Compilation happens at
    the first call and takes seconds (docs/decode.md has the measured compile times).

    Before every call torch.compile checks guards on everything the step reads; over the whole LeanWeights object
    graph that is a sizeable share of a step. This step checks none. That is sound because nothing it reads can
    change between calls: the configuration fixes every constant (norm epsilons, head counts, top-k, routing scale),
    the key fixes ``capture``, every shape and the weights' dtype, and `LeanDecoder` passes contiguous tensors only.
    Each key gets its own copy of lean_step's code object, which is where torch.compile keeps its compiled graph. The
    weights are inputs, not constants, so a retrained or reloaded model of the same configuration reuses the compiled
    step."""
    del structure, capture, batch, capacity, weights_dtype  # the cache key
    step = types.FunctionType(lean_step.__code__.replace(), lean_step.__globals__, lean_step.__name__)
    # realize_acc_reads_threshold 1: a value that a reduction reads is computed once into a buffer. By default
    # inductor inlines it, and with bf16 weights (`project` sums broadcast products) the LM head recomputed the final
    # norm for each of its 32,256 rows (with it, deepseek-v3-tiny's bf16 step took 30% less time on one thread).
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe, "realize_acc_reads_threshold": 1}
    options.update({"triton.cudagraphs": True} if device_type == "cuda" else {"cpp_wrapper": True})
    return torch.compile(step, dynamic=False, options=options)


WARMED_UP: set = set()  # the compiled steps that have run (and so compiled) once


def static_capacity(needed: int, positions: int) -> int:
    """The cache columns of a compiled step: powers of two (at least 64) up to the model's positions, so that a
    server sees a handful of shapes (and compilations), not one per prompt length."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(positions, needed))


class LeanDecoder:
    """A `Decoder`: prefill through the model's forward (`CachedForward`), then lean steps.

    ``compiled`` steps with `compiled_lean_step`, which attends over the whole preallocated cache with future columns
    masked, so that its shapes never change; the eager `lean_step` attends over the live columns only."""

    def __init__(self, model, weights: LeanWeights, batch: int, capacity: int, capture: bool, compiled: bool = False):
        self.prefill_forward = CachedForward(model, capture)
        self.static, self.step_function = compiled, lean_step
        if compiled:
            capacity = static_capacity(capacity, model.config.max_position_embeddings)
            self.step_function = compiled_lean_step(
                model.config.to_json_string(), capture, batch, capacity, weights.head.device.type, weights.dtype
            )
        self.weights, self.capacity, self.capture, self.batch = weights, capacity, capture, batch
        self.caches = self.new_caches()
        self.column = torch.zeros(batch, dtype=torch.long, device=weights.head.device)  # every row writes the same one
        self.mask = None
        self.routed: torch.Tensor | None = None
        self.prefilled = False

    def new_caches(self) -> list:
        return [
            (attention.new_cache(self.batch, self.capacity), feed_forward.new_cache(self.batch, self.capacity))
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
            self.mask = self.weights.embedding.new_full((input_ids.shape[0], 1, 1, self.capacity), float("-inf"))
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
        path = "compiled lean step" if self.static else "lean step"
        if self.weights.dtype == self.weights.embedding.dtype:
            return path
        names = {dtype: name for name, dtype in WEIGHT_DTYPES.items()}
        return f"{path}, {names.get(self.weights.dtype, self.weights.dtype)} weights"

    def experts(self) -> list[list[list[int]]]:
        if self.prefilled:
            return self.prefill_forward.experts()
        if self.routed is None:
            return [[] for _ in range(len(self.positions))]
        return self.routed.tolist()
