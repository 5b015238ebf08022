"""Regional compilation for training: torch.compile on each decoder layer's training forward, applied from outside
the model like data parallelism.

Compiling the whole model traces the LM head, the loss and every layer into one graph and compiles each distinct
shape for minutes on a CPU; the layers are identical code, so compiling the block compiles one graph (two for a dense
first layer before MoE layers) that every layer reuses, in seconds. Evaluation and cached decoding keep the eager
forward: their shapes change from call to call and would only trigger recompilation.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from tinyseek.modeling import DecoderLayer


def compiler_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels on this device (no C++ compiler, no Triton, ...), or None.

    A failed compile surfaces only at the first call, in the middle of a training step; a tiny probe through the same
    backend (forward and backward) finds out before the first step instead."""
    def probe_function(x):
        return (x.sin() * 2).sum()

    try:
        probe = torch.compile(probe_function, dynamic=False)
        x = torch.ones(8, device=device, requires_grad=True)
        probe(x).backward()
    except Exception as error:  # any failure of the compiler stack means: train eagerly
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"{type(error).__name__}: {first_line[:200]}"
    return None


def compile_decoder_layers(model: nn.Module, device: torch.device) -> str:
    """Compile the training forward of every decoder layer of `model` in place; returns the path taken, in words."""
    started = time.perf_counter()
    problem = compiler_problem(device)
    if problem is not None:
        return f"eager (torch.compile unavailable here: {problem})"
    layers = [module for module in model.modules() if isinstance(module, DecoderLayer)]
    for layer in layers:
        layer.forward = training_forward_compiled(layer)
    return f"{len(layers)} decoder layers compiled for training (compiler check {time.perf_counter() - started:.1f} s)"


def training_forward_compiled(layer: DecoderLayer):
    eager = layer.forward
    compiled = torch.compile(eager, dynamic=False)

    @functools.wraps(eager)
    def forward(hidden_states, rotary=None, causal_mask=None, padding_mask=None, cache_layer=None):
        if layer.training and cache_layer is None:
            return compiled(hidden_states, rotary, causal_mask, padding_mask)
        return eager(hidden_states, rotary, causal_mask, padding_mask, cache_layer)

    return forward
