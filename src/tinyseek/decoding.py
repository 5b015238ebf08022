"""What every single-token decode step shares: weights arranged once as [in, out], RoPE applied from a rotated copy,
and the `Step` each layer reads.

Each attention and feed-forward type declares its own decode step (``AttentionSpec.decode_step``,
``FeedForwardSpec.decode_step``) beside its module; `tinyseek.generate.lean` only drives them. At these sizes a
decode step does ~10 MFLOP, well under a millisecond of arithmetic; what costs is the number of operations, each a few
microseconds of dispatch, and GEMM calls in the shape BLAS is slow at. So every step follows the same rules:

* every weight is stored once as [in, out], contiguous: for one row, ``x @ W`` runs MKL's fast path, while
  ``F.linear(x, W)`` on the [out, in] parameter runs a transposed GEMM that is several times slower for a wide head;
* projections that read the same input are one GEMM against weights concatenated once, not per call;
* RoPE is x * cos + (x @ R) * sin with R rotate-half's signed permutation, from tables built once;
* caches are preallocated and written in place at the step's column; nothing grows, nothing is concatenated.

A step is built once from its module as ``Step(module, weights_dtype)``: the GEMM weights it arranges are stored in
``weights_dtype`` (fp32, or bf16 to halve the bytes a step reads; see `project`), and everything else (norms, biases,
the router, RoPE tables, its caches) in the model's dtype, its ``dtype``, which is also the residual stream's.

An attention step has ``new_cache(batch, capacity)``, ``load(cache, cache_layer, length)`` (copy the prefill's
`TinySeekCache` entry in) and ``__call__(x, step, cache, rotary)``; a feed-forward step has ``new_cache(batch,
capacity)`` (None when it needs none) and ``__call__(x, cache, routed)``, appending its routed experts to ``routed``
when that is a list. Every tensor a step holds is contiguous, or (narrower weights) a transposed view of a contiguous
tensor: its layout is fixed by the configuration and the weights' dtype, which the compiled step relies on. Every
cache tensor has the batch row as its leading dimension (alone, or times a per-row count such as heads), so that a
continuous batch (`tinyseek.generate.batch`) can load, move and step any row's slice without knowing the type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def arranged(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of ``weight`` [in, out] as a step stores it in ``dtype`` (default: its own). In its own dtype it is
    contiguous. Narrower (bf16), each output's inputs lie side by side ([out, in] contiguous, seen as [in, out]): a
    compiled step then reads every weight once, in order, summing along it (`project`)."""
    if dtype is None or dtype == weight.dtype:
        return weight.contiguous()
    return weight.t().to(dtype).contiguous().t()


def transposed(*weights: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """nn.Linear weights [out, in] stacked along out, `arranged` as [in, out] in ``dtype``."""
    return arranged(torch.cat([w.detach() for w in weights]).t(), dtype)


def joined_bias(layers) -> torch.Tensor | None:
    """The layers' biases side by side (zeros for a layer without one), or None if none has a bias."""
    if all(getattr(layer, "bias", None) is None for layer in layers):
        return None
    return torch.cat([layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.out_features) for layer in layers])


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight (+ bias) in x's dtype. Against weights stored narrower (bf16), products and sums are in fp32:

    * in a compiled step, one row is a broadcast product summed over the input dimension, which torch.compile turns
      into one loop that widens each weight as it reads it; torch's bf16 GEMM would round x and the result to bf16,
      and costs more per call for a single row than the bytes it saves;
    * otherwise x is rounded to bf16 and torch's bf16 GEMM (oneDNN with AVX512-BF16 or AMX on CPUs, cuBLAS on GPUs)
      accumulates in fp32; its result, rounded to bf16, returns to x's dtype.

    The bias stays in x's dtype and is added after."""
    if weight.dtype == x.dtype:
        return x @ weight if bias is None else torch.addmm(bias, x, weight)
    if torch.compiler.is_compiling() and x.shape[0] == 1:
        output = (x[..., None] * weight).sum(dim=-2)
    else:
        output = (x.to(weight.dtype) @ weight).to(x.dtype)
    return output if bias is None else output + bias


def write_columns(cache: torch.Tensor, dim: int, column: torch.Tensor, values: torch.Tensor) -> None:
    """Each row b writes values[b] (size 1 along ``dim``) at its own cache column ``column[b]`` along ``dim``.

    As an indexed assignment (index_put_), not scatter_: torch.compile writes an index_put_ into the cache in place,
    while it turned scatter_ into a copy of the whole cache and a copy back, twice per layer and step (a quarter of
    llama-tiny's compiled bf16 step at batch 1)."""
    rows = torch.arange(cache.shape[0], device=cache.device)
    cache[(rows, *[slice(None)] * (dim - 1), column)] = values.squeeze(dim)


def rotated_rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The rows of a [heads * dim, in] projection that produce rotate_half of its output, head by head."""
    heads = weight.view(-1, dim, weight.shape[-1])
    first, second = heads.chunk(2, dim=1)
    return torch.cat((-second, first), dim=1).flatten(0, 1)


class Rotary:
    """cos and sin for every position. RoPE is x * cos + rotate_half(x) * sin, and rotate_half(x) = [-x2, x1] is
    linear in x: the projections that produce a RoPE'd vector also produce its rotated copy (`rotated_rows`), so
    applying RoPE is two elementwise operations and no extra GEMM."""

    def __init__(self, rotary_embedding, positions: int, device):
        cos, sin = rotary_embedding(torch.arange(positions, device=device)[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    @staticmethod
    def apply(x: torch.Tensor, rotated: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [B, heads, d] given rotate_half(x), with cos/sin [B, 1, d]."""
        return torch.addcmul(x * cos, rotated, sin)


@dataclass
class Step:
    """What every layer reads in one step: the rows' cos/sin for RoPE ([B, 1, d] or None), the cache column each row
    writes ([B]: rows of a continuous batch have their own lengths; a tensor, so a compiled step does not specialise on
    it), the number of cache columns attended, and the additive mask over them (None when no column needs masking)."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    column: torch.Tensor
    length: int
    mask: torch.Tensor | None
