"""The one place that decides which device tinyseek runs on, for training, generation and serving alike, and what
its CPU can do."""

from __future__ import annotations

import functools

import torch

from tinyseek.errors import ConfigError


def choose_device(requested: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if present, else Apple's MPS, else the CPU. Anything else (``"cpu"``, ``"cuda:1"``, ``"mps"``)
    is taken as asked, after checking that this machine has it."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {requested!r}: MPS is not available on this machine")
    return device


# What a decode step may store its weights in (`--weights`); "auto" is resolved by `decode_weights_dtype`.
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHT_CHOICES = ("auto", *WEIGHT_DTYPES)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bf16 arithmetic: where a CPU lacks both, torch's bf16 GEMM is an emulation several times
slower than its fp32 GEMM (tens of times on AVX2-only x86), so halving the bytes read would cost speed, not save it."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux's /proc/cpuinfo lists them (x86's "flags", ARM's "Features"); empty where
    there is no such file."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def has_bf16_units(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively here: a CUDA GPU with bf16 support, or a CPU that reports
    avx512_bf16 or amx_bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def decode_weights_dtype(weights: str, device: torch.device) -> torch.dtype:
    """The dtype a decode step keeps its weights in: ``"fp32"``, ``"bf16"``, or ``"auto"`` (bf16 where the device
    has bf16 units, `has_bf16_units`; fp32 elsewhere)."""
    if weights == "auto":
        return torch.bfloat16 if has_bf16_units(device) else torch.float32
    if weights not in WEIGHT_DTYPES:
        raise ConfigError(f"weights: must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    return WEIGHT_DTYPES[weights]
