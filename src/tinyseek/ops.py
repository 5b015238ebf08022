"""Fast training kernels in plain PyTorch: a chunked fused LM-head + cross-entropy, and bf16 linears on CPUs that have
no native bf16 matrix multiply.

Both compute what the plain path computes (``F.cross_entropy(lm_head(h).float(), y)`` and ``F.linear`` under
autocast); ``tests/test_fused_ops.py`` checks losses and gradients against it. Why they exist (measured with
``benchmarks/train_speed.py``, see docs/benchmarks.md):

* At the seed's size the LM head (hidden 128 -> vocab 32256) is ~80% of the FLOPs, and the plain path materialises
  B x T x 32256 logits several times per step (logits, their fp32 copy, log-probabilities, their gradient): hundreds
  of MB of memory traffic and, with glibc's allocator, fresh page faults every step. ``linear_cross_entropy`` walks
  the tokens in chunks, keeps one chunk of logits in a reused workspace, and computes the loss *and* both gradients
  in the forward pass, so the full logits never exist.
* On x86 CPUs without AVX512-BF16/AMX, torch's bf16 GEMM is a slow fallback, far below the fp32 GEMM. A bf16
  product of two bf16 numbers is exact in fp32, so multiplying the bf16-rounded operands with the fp32 GEMM and
  rounding the result to bf16 gives autocast's bf16 semantics at fp32-GEMM speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import platform

import torch
import torch.nn.functional as F
from torch import nn

from tinyseek.device import BF16_CPU_FLAGS, cpu_flags

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 256
"""Tokens per chunk of ``linear_cross_entropy``: at vocab 32256 one fp32 chunk is 33 MB (two are kept: the logits and
the probabilities), which fits next to the model in a 32 MB L3 well enough and keeps the number of passes over the
[V, H] head-gradient accumulator (one per chunk) small."""


@torch.compiler.assume_constant_result  # torch.compile calls it instead of tracing the file read
def cpu_has_native_bf16_matmul() -> bool:
    """True where torch's CPU bf16 GEMM runs on bf16 hardware (oneDNN with AVX512-BF16 or AMX, or an ARM CPU with
    BF16); False on plain AVX2/AVX-512 x86, where bf16 matmuls are emulated slowly."""
    return _cpu_has_native_bf16_matmul()


@functools.cache
def _cpu_has_native_bf16_matmul() -> bool:
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        flags = cpu_flags()
        # No /proc/cpuinfo (not Linux): trust torch's own kernel choice.
        return not flags or any(flag in flags for flag in BF16_CPU_FLAGS)
    return True


def autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def emulate_bf16_matmul(device_type: str) -> bool:
    """Whether bf16 matmuls on this device should run as fp32 GEMMs on bf16-rounded operands."""
    return device_type == "cpu" and autocast_dtype("cpu") == torch.bfloat16 and not cpu_has_native_bf16_matmul()


# ----------------------------------------------------------------------------------------------------------------
# Memory

GLIBC_M_TRIM_THRESHOLD, GLIBC_M_TOP_PAD, GLIBC_M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel. Returns whether it
    could (False off glibc, where this does nothing). A process-wide setting, so `StepMemory` applies it for the
    training steps that own one; setting it again changes nothing.

    A training step on the CPU frees and re-allocates the same large blocks every micro-step (the gradients of the
    embedding and the LM head, logits, activations). By default glibc serves blocks above a few MB with mmap and
    unmaps them on free, and trims the heap top above 128 KB, so every step page-faults those blocks back in: a large
    share of a small micro-batch's step. Blocks up to 32 MB then come from the heap and freed memory stays mapped; the
    process's resident size stays at its peak, as with any caching allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in (
            (GLIBC_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX), (GLIBC_M_TRIM_THRESHOLD, 2**30),
            (GLIBC_M_TOP_PAD, 64 * 2**20),
        ))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# Linear layers


class _EmulatedBF16Linear(torch.autograd.Function):
    """y = round_bf16(round_bf16(x) @ round_bf16(W)^T + b), products and sums in fp32 (what bf16 GEMM hardware does).

    Gradients are computed in fp32 from the bf16-rounded operands and not rounded again (slightly more accurate than
    autocast's bf16 gradient matmuls)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        with torch.autocast("cpu", enabled=False):
            x_bf16, w_bf16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            bias32 = None if bias is None else bias.to(torch.bfloat16).float()
            out = F.linear(x_bf16.float(), w_bf16.float(), bias32).to(torch.bfloat16)
        ctx.save_for_backward(x_bf16, w_bf16)
        ctx.has_bias = bias is not None
        ctx.input_dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_bf16, w_bf16 = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grad = grad_out.float()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ w_bf16.float()).to(ctx.input_dtypes[0])
            flat_grad = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = (flat_grad.t() @ x_bf16.reshape(-1, x_bf16.shape[-1]).float()).to(ctx.input_dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that, under CPU bf16 autocast on a CPU without bf16 matmul hardware, runs the fp32 GEMM on the
    bf16-rounded operands instead of torch's slow bf16 fallback. Anywhere else it is exactly ``F.linear``."""
    if emulate_bf16_matmul(x.device.type):
        return _EmulatedBF16Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same printout) whose forward is ``tinyseek.ops.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fused_linear(x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of several linear layers that read the same input (q/k/v, gate/up), from one GEMM.

    The weights are concatenated at call time rather than stored fused, so parameter names, checkpoints and the
    transformers conversion stay exactly as they are; the copy is small next to the matmul it saves. At 32 tokens a
    step is dominated by the number of operations, and one GEMM (forward, and two in backward) replaces three."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features) for layer in layers])
    return linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


class _RowSparseEmbedding(torch.autograd.Function):
    """``F.embedding`` whose gradient is row-sparse once the weight already holds a dense gradient."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if type(weight.grad) is torch.Tensor and weight.grad.layout == torch.strided:
            # Accumulated as weight.grad += sparse: an index_add of the batch's rows.
            return None, torch.sparse_coo_tensor(ids.reshape(1, -1), rows, weight.shape, check_invariants=False)
        return None, torch.zeros(weight.shape, dtype=rows.dtype, device=rows.device).index_add_(0, ids.flatten(), rows)


class Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameters, same printout) that, with ``accumulate_sparse_gradients`` set, hands
    autograd a row-sparse gradient whenever the weight already holds a dense one (gradient accumulation).

    The dense gradient of a 32-token micro-batch is a zero-filled [vocab, hidden] matrix (16 MB at the seed's size)
    with 32 rows set, which autograd then adds into the existing gradient: several full passes over it per
    micro-batch for 32 rows of information. The first micro-batch after ``zero_grad`` still gets a dense gradient, so
    ``weight.grad`` is always dense for clipping and the optimizer. Off by default: data-parallel wrappers (DDP,
    FSDP) reduce dense gradient buckets, so only single-process training switches it on."""

    accumulate_sparse_gradients = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.accumulate_sparse_gradients and self.weight.requires_grad and torch.is_grad_enabled() and (
            self.padding_idx is None and self.max_norm is None and not self.scale_grad_by_freq and not self.sparse
        ):
            return _RowSparseEmbedding.apply(ids, self.weight)
        return super().forward(ids)


def scaled_dot_product_attention(query, key, value, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; where bf16 matmuls are emulated (see ``linear``), the bf16 inputs are
    attended in fp32 and the output rounded back to bf16: torch's bf16 flash-attention kernels run several times
    slower than fp32 there (backward especially), and fp32 scores are at least as accurate."""
    if emulate_bf16_matmul(query.device.type):
        with torch.autocast("cpu", enabled=False):
            output = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), **kwargs)
        return output.to(torch.bfloat16)
    return F.scaled_dot_product_attention(query, key, value, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Fused LM head + cross-entropy

class StepMemory:
    """What the fused training kernels keep from one call to the next, owned by whoever runs the training steps (the
    trainer) and handed to the model's forward (``step_memory=``): scratch buffers, the open accumulation window, and
    on the CPU glibc's allocator set to keep freed memory (`keep_freed_memory`). Without one, every call allocates
    afresh and nothing is shared between micro-batches; the results are the same."""

    def __init__(self, device: torch.device | str = "cpu", tune_allocator: bool = True):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.window: _AccumulationWindow | None = None
        self.keeps_freed_memory = tune_allocator and torch.device(device).type == "cpu" and keep_freed_memory()

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A scratch tensor kept between calls. Re-allocating tens of MB every step costs more than its arithmetic
        with glibc's allocator (it unmaps large blocks on free, and the next step page-faults them back in)."""
        key = (name, dtype, str(device))
        buffer = self.buffers.get(key)
        numel = math.prod(shape)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def release_workspaces(self) -> None:
        """Free the scratch buffers (they are re-created on the next call)."""
        self.buffers.clear()

    @contextlib.contextmanager
    def gradient_accumulation(self, defer_head_gradients: bool = False):
        """The micro-batches of one optimizer step; no weight changes inside. The LM head's operand copy (bf16, or
        rounded to bf16) is made once, where otherwise every micro-batch would make it again: a pass over the whole
        [V, H] matrix per micro-batch.

        With ``defer_head_gradients``, a micro-batch small enough for one chunk of `linear_cross_entropy` leaves its
        head-weight gradient to the end of the window, which computes it from all micro-batches' rows at once and
        adds it to ``weight.grad``: one GEMM over all the rows instead of one thin GEMM per micro-batch, each
        followed by full passes over the [V, H] result (its conversion to fp32 and the addition). Single process
        only: data-parallel wrappers reduce gradients as autograd accumulates them, and this one bypasses autograd."""
        if self.window is not None:  # nested: the outer window decides
            yield
            return
        window = self.window = _AccumulationWindow(defer_head_gradients)
        try:
            yield
        finally:
            self.window = None
        for weight, parts in (window.deferred or {}).values():
            with torch.autocast(weight.device.type, enabled=False):
                gradient = (torch.cat([g for g, _ in parts]).t() @ torch.cat([h for _, h in parts])).to(weight.dtype)
            if weight.grad is None:
                weight.grad = gradient
            else:
                weight.grad.add_(gradient)

    def weight_operand(self, weight: torch.Tensor, dtype: torch.dtype, rounded_to_fp32: bool,
                       scratch: str | None) -> torch.Tensor:
        """``weight`` as a GEMM operand: cast to ``dtype``, then back to fp32 with ``rounded_to_fp32``. Outside
        `gradient_accumulation` a fresh copy (in the workspace ``scratch`` if given); inside it, the copy made for
        the same weight before."""
        if self.window is None:
            return _weight_operand(weight, dtype, rounded_to_fp32, self.workspace(
                scratch, tuple(weight.shape), torch.float32, weight.device) if scratch and rounded_to_fp32 else None)
        key = (id(weight), weight.data_ptr(), dtype, rounded_to_fp32)
        if key not in self.window.operands:
            self.window.operands[key] = _weight_operand(weight, dtype, rounded_to_fp32, None)
        return self.window.operands[key]

    def defers_head_gradients(self) -> bool:
        return self.window is not None and self.window.deferred is not None

    def defer_head_gradient(self, weight: torch.Tensor, grad_logits: torch.Tensor, scaled_hidden: torch.Tensor) -> None:
        self.window.deferred.setdefault(id(weight), (weight, []))[1].append((grad_logits, scaled_hidden))


class _AccumulationWindow:
    def __init__(self, defer_head_gradients: bool):
        self.operands: dict = {}  # (weight id, data pointer, dtype, rounded) -> the operand copy
        # id(weight) -> (weight, [(the rows' logit gradients, their scaled hidden states), ...]), or None: not deferred
        self.deferred: dict | None = {} if defer_head_gradients else None


def _weight_operand(weight: torch.Tensor, dtype: torch.dtype, rounded_to_fp32: bool,
                    out: torch.Tensor | None) -> torch.Tensor:
    if not rounded_to_fp32:
        return weight.to(dtype)
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if out is None else out
    return out.copy_(weight.to(dtype))


def host_sync_is_cheap(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing more than the arithmetic (no device to wait for)."""
    return device.type == "cpu"


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight^T`` against ``targets``, computed chunk by chunk of tokens.

    For each chunk: logits = h_c W^T (fp32), p = softmax(logits), loss_c = -sum log p[target]; the gradient of the
    mean loss wrt the logits is (p - onehot) / n_valid, so grad_h_c = (p - onehot) W / n and
    grad_W += (p - onehot)^T h_c / n are accumulated right away. Backward only scales them by the incoming gradient.

    With a z-loss (PaLM's, coefficient c > 0) the objective adds c * mean(lse^2), lse = the log-partition
    logsumexp(logits) = logit[target] - log p[target]; its gradient wrt the logits is 2 c lse p / n, so each row of p
    is scaled by (1 + 2 c lse) before the one-hot is subtracted, and the products above are unchanged.

    With a logit soft-cap s > 0 the logits are s tanh(h W^T / s), and the gradient wrt the products is the one wrt the
    logits times 1 - (logits / s)^2.

    When all tokens fit in one chunk (a 32-token micro-batch), the two gradient products wait for backward instead,
    on the kept p - onehot: there the incoming gradient (1 / accumulation steps in the trainer) folds into the small
    operands, where scaling the finished [V, H] head gradient would be one more full pass over it per micro-batch.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, operand_dtype, memory, z_loss_coef, softcap):
        # operand_dtype: None = fp32 throughout; bf16 = operands rounded to bf16 (autocast), multiplied in bf16
        # where the hardware has it, else by the fp32 GEMM (exact products, fp32 sums).
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        need_grad_h, need_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device
        bf16_native = operand_dtype == torch.bfloat16 and (device.type != "cpu" or cpu_has_native_bf16_matmul())
        with torch.autocast(device.type, enabled=False):
            if operand_dtype is None:
                h_op, w_op = hidden.float(), weight.float()
            elif bf16_native:
                h_op, w_op = hidden.to(operand_dtype), memory.weight_operand(weight, operand_dtype, False, None)
            deferred = num_tokens <= chunk_rows and (need_grad_h or need_grad_w)
            if operand_dtype is not None and not bf16_native:
                h_op = hidden.to(operand_dtype).float()
                # Kept for backward when deferred, so then not in the shared workspace another call could overwrite.
                w_op = memory.weight_operand(weight, operand_dtype, True, None if deferred else "weight")
            valid = targets != ignore_index
            num_valid = valid.sum()  # stays a tensor: no host sync
            safe_targets = torch.where(valid, targets, 0)
            # Per-token factor of the gradient: 1/n for counted tokens, 0 for ignored ones.
            row_scale = valid.float() / num_valid.clamp(min=1)

            rows = min(chunk_rows, num_tokens)
            logits_buf = memory.workspace("logits", (rows, vocab), torch.float32, device)
            probs_buf = torch.empty(rows, vocab, device=device) if deferred else memory.workspace(
                "probs", (rows, vocab), torch.float32, device)
            grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=device) if need_grad_h and not deferred else None
            # Written by the first chunk's product (no zero-fill pass over [V, H]), accumulated by the others.
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=device) if need_grad_w and not deferred else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            z_sum = torch.zeros((), dtype=torch.float32, device=device)

            for start in range(0, num_tokens, rows):
                stop = min(start + rows, num_tokens)
                n = stop - start
                h_c, t_c = h_op[start:stop], safe_targets[start:stop]
                logits, probs = logits_buf[:n], probs_buf[:n]
                if bf16_native:
                    logits.copy_(h_c @ w_op.t())
                else:
                    torch.mm(h_c, w_op.t(), out=logits)
                if softcap:
                    logits.div_(softcap).tanh_().mul_(softcap)
                # One fused row-wise pass instead of max / exp / sum / log passes over the chunk.
                torch.softmax(logits, 1, out=probs)
                arange = torch.arange(n, device=device)
                p_target = probs[arange, t_c]
                token_loss = -torch.log(p_target)
                underflow = p_target < 1e-30  # -log p is then inexact; recompute those rows from the logits
                if host_sync_is_cheap(device):  # then checking usually skips the recomputation
                    if bool(underflow.any()):
                        picked = underflow.nonzero().squeeze(1)
                        token_loss[picked] = torch.logsumexp(logits[picked], 1) - logits[picked, t_c[picked]]
                else:  # no host synchronisation per chunk on accelerators: recompute every row, keep the underflowed
                    exact = torch.logsumexp(logits, 1) - logits[arange, t_c]
                    token_loss = torch.where(underflow, exact, token_loss)
                loss_sum += (token_loss * valid[start:stop]).sum()
                if z_loss_coef:
                    log_partition = logits[arange, t_c] + token_loss
                    z_sum += (log_partition.square() * valid[start:stop]).sum()
                if not (need_grad_h or need_grad_w):
                    continue
                if z_loss_coef:
                    probs.mul_((1 + 2 * z_loss_coef * log_partition)[:, None])
                probs[arange, t_c] -= 1.0  # p - onehot; the 1/n and ignore mask are applied to the small operands
                if softcap:  # the logits are not read again: their buffer becomes the cap's derivative
                    probs.mul_(logits.div_(softcap).square_().neg_().add_(1.0))
                grad_logits = probs.to(operand_dtype) if bf16_native else probs
                if deferred:
                    break
                scale = row_scale[start:stop, None]
                if need_grad_h:
                    if bf16_native:
                        grad_h[start:stop] = grad_logits @ w_op
                    else:
                        torch.mm(grad_logits, w_op, out=grad_h[start:stop])
                    grad_h[start:stop] *= scale
                if need_grad_w:
                    scaled_h = (h_c.float() * scale).to(grad_logits.dtype)
                    if bf16_native:
                        product = grad_logits.t() @ scaled_h
                        if start == 0:
                            grad_w.copy_(product)
                        else:
                            grad_w.add_(product)
                    elif start == 0:
                        torch.mm(grad_logits.t(), scaled_h, out=grad_w)
                    else:
                        grad_w.addmm_(grad_logits.t(), scaled_h)

        # Kept on ctx rather than saved: they are neither inputs nor outputs, and backward hands them over (scaled in
        # place), so the graph cannot be back-propagated twice.
        ctx.grads = (grad_h, grad_w)
        ctx.deferred = (grad_logits, h_op, w_op, row_scale, weight, memory) if deferred else None
        ctx.needs = (need_grad_h, need_grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        # NaN when every target is ignored, as F.cross_entropy gives. The plain cross-entropy is reported beside the
        # objective (what is back-propagated), so logs and bits per byte never include the z-loss.
        cross_entropy = loss_sum / num_valid
        ctx.mark_non_differentiable(cross_entropy)
        return (loss_sum + z_loss_coef * z_sum) / num_valid, cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_cross_entropy):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy computes its gradients once; it cannot be back-propagated twice")
        grads, ctx.grads = ctx.grads, None
        if ctx.deferred is not None:
            grads, ctx.deferred = _deferred_head_gradients(*ctx.deferred, grad_loss, *ctx.needs), None
        else:
            # The loss is usually back-propagated as is (gradient 1): skip a pass over the 16 MB head gradient then.
            unit = grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0
            grads = [None if g is None else (g if unit else g.mul_(grad_loss)) for g in grads]
        grad_h, grad_w = (None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return grad_h, grad_w, None, None, None, None, None, None, None


def _deferred_head_gradients(grad_logits, h_op, w_op, row_scale, weight, memory, grad_loss, need_grad_h, need_grad_w):
    """grad_h = (p - onehot) W * s and grad_W = (p - onehot)^T (h * s), with s = grad_loss / n per token, computed in
    backward; operands as in the forward (fp32, or bf16 where the hardware multiplies bf16). Inside a
    `gradient_accumulation` window that defers head gradients, grad_W is left to the window (None here)."""
    with torch.autocast(h_op.device.type, enabled=False):
        scale = (row_scale * grad_loss.float())[:, None]
        grad_h = (grad_logits @ w_op).float() * scale if need_grad_h else None
        grad_w = None
        if need_grad_w:
            scaled_h = (h_op.float() * scale).to(grad_logits.dtype)
            if memory.defers_head_gradients():
                memory.defer_head_gradient(weight, grad_logits, scaled_h)
            else:
                grad_w = (grad_logits.t() @ scaled_h).float()
    return grad_h, grad_w


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    memory: StepMemory | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(), ignore_index)`` (mean
    over non-ignored targets) without materialising the logits. Under bf16 autocast the operands are rounded to
    bf16 as autocast would; the logits stay in fp32 (the plain path rounds them to bf16 first). ``memory``: the
    training steps' `StepMemory` (its scratch buffers and accumulation window), else buffers of this call's own.
    ``softcap``: the logits are `soft_capped` first."""
    return linear_cross_entropy_with_z_loss(hidden, weight, targets, 0.0, ignore_index, chunk_rows, memory, softcap)[0]


def linear_cross_entropy_with_z_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_loss_coef: float,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    memory: StepMemory | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `linear_cross_entropy`: (the cross-entropy plus ``z_loss_coef`` x the mean squared log-partition of the
    counted tokens' logits, to back-propagate; the cross-entropy alone, without gradient, to report)."""
    hidden_size = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, hidden_size)
    operand_dtype = autocast_dtype(hidden.device.type)
    memory = memory if memory is not None else StepMemory(tune_allocator=False)
    return _LinearCrossEntropy.apply(
        flat_hidden, weight, targets.reshape(-1), ignore_index, chunk_rows, operand_dtype, memory, float(z_loss_coef),
        float(softcap or 0.0),
    )


def soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)``: logits bounded to (-softcap, softcap), in the same order; unchanged for
    None."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap
